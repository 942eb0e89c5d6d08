"""Pure slicing logic on toy graphs built with onnx.helper: order, tensor classes, crossing sets, cuts, DP."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from slicing.graph import CONST, HEAVY, LIGHT, GraphAnalysis, ProbeShapes, topological_order
from slicing.inputs import InputSpec, infer_input_specs, make_inputs
from slicing.partition import partition_units
from slicing.chain import favoured_batch_size, profile_batch_sizes
from core.errors import BadParameterError, SliceError


def _weight(name: str, shape=(4, 4)) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, dtype=np.float32), name)


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "toy", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _probe_for(model: onnx.ModelProto, rank_of=None) -> ProbeShapes:
    """Fake probe: every tensor is [batch, 4] (batch 2 then 3), except int64 bookkeeping [4]."""
    names = [v.name for v in model.graph.input] + [o for n in model.graph.node for o in n.output]
    shapes, dtypes = {}, {}
    for name in names:
        if rank_of and name in rank_of:
            shapes[name] = rank_of[name]
            dtypes[name] = "int64"
        else:
            shapes[name] = ((2, 4), (3, 4))
            dtypes[name] = "float32"
    return ProbeShapes((2, 3), None, shapes, dtypes)


def _diamond() -> onnx.ModelProto:
    """x -> A -> (B, C) -> D -> y: the two branches cross every cut between A and D."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"], name="A"),
        helper.make_node("MatMul", ["a", "wb"], ["b"], name="B"),
        helper.make_node("MatMul", ["a", "wc"], ["c"], name="C"),
        helper.make_node("Add", ["b", "c"], ["d"], name="D"),
        helper.make_node("Relu", ["d"], ["y"], name="E"),
    ]
    return _model(nodes, [x], [y], [_weight("wa"), _weight("wb"), _weight("wc")])


def test_graph_topological_order_when_nodes_are_shuffled():
    model = _diamond()
    shuffled = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(shuffled)
    order = [node.name for node in topological_order(model.graph)]
    assert order.index("A") < order.index("B") < order.index("D") < order.index("E")
    assert order.index("C") < order.index("D")


def test_graph_crossing_sets_of_a_diamond():
    analysis = GraphAnalysis(_diamond(), _probe_for(_diamond()))
    crossing = analysis.crossing_sets()
    assert crossing[1] == ["a"]  # after A
    assert crossing[2] == ["a", "b"]  # after B: C still needs a
    assert crossing[3] == ["b", "c"]
    assert crossing[4] == ["d"]
    assert all(name not in ("wa", "wb", "wc") for names in crossing for name in names)  # weights never cross
    cuts = analysis.candidate_cuts()
    assert [cut.crossing for cut in cuts] == [("a",), ("d",)]


def test_graph_light_mask_tensors_never_cross():
    """An integer mask input feeds bookkeeping that every stage recomputes instead of receiving."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    mask = helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [
        helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "mask_f"], ["inverted"]),
        helper.make_node("Mul", ["inverted", "big"], ["bias"]),
        helper.make_node("MatMul", ["x", "w1"], ["h1"]),
        helper.make_node("Add", ["h1", "bias"], ["h1m"]),
        helper.make_node("MatMul", ["h1m", "w2"], ["h2"]),
        helper.make_node("Add", ["h2", "bias"], ["y"]),
    ]
    inits = [_weight("w1"), _weight("w2"), numpy_helper.from_array(np.float32(1.0), "one"),
             numpy_helper.from_array(np.float32(-1e4), "big")]
    model = _model(nodes, [x, mask], [y], inits)
    analysis = GraphAnalysis(model, _probe_for(model))
    assert analysis.kinds["mask"] == LIGHT and analysis.kinds["bias"] == LIGHT
    assert analysis.kinds["one"] == CONST and analysis.kinds["h1"] == HEAVY and analysis.kinds["x"] == HEAVY
    crossing = analysis.crossing_sets()
    assert all("bias" not in names and "mask_f" not in names for names in crossing)
    assert [cut.crossing for cut in analysis.candidate_cuts()] == [("h1",), ("h1m",), ("h2",)]


def test_graph_inception_like_block_cuts_only_between_blocks():
    """Four parallel branches concatenated: inside a block 2+ tensors cross, between blocks one."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])
    nodes, inits, current = [helper.make_node("MatMul", ["x", "stem"], ["s"])], [_weight("stem")], "s"
    for block in range(2):
        branches = []
        for branch in range(4):
            name = f"b{block}_{branch}"
            inits.append(_weight(f"w{name}", (4, 4)))
            nodes.append(helper.make_node("MatMul", [current, f"w{name}"], [name]))
            branches.append(name)
        nodes.append(helper.make_node("Concat", branches, [f"cat{block}"], axis=1))
        inits.append(_weight(f"proj{block}", (16, 4) if block == 0 else (16, 16)))
        nodes.append(helper.make_node("MatMul", [f"cat{block}", f"proj{block}"], [f"m{block}"]))
        current = f"m{block}"
    nodes[-1] = helper.make_node("MatMul", ["cat1", "proj1"], ["y"])
    model = _model(nodes, [x], [y], inits)
    analysis = GraphAnalysis(model, _probe_for(model))
    crossing = analysis.crossing_sets()
    assert crossing[3] == ["s", "b0_0", "b0_1"]  # inside block 0
    assert crossing[10] == ["m0", "b1_0", "b1_1", "b1_2"]  # inside block 1
    assert [cut.crossing for cut in analysis.candidate_cuts()] == [("s",), ("cat0",), ("m0",), ("cat1",)]


def test_graph_cut_for_unknown_tensor_names_the_candidates():
    analysis = GraphAnalysis(_diamond(), _probe_for(_diamond()))
    with pytest.raises(SliceError, match=r"unknown cut tensor\(s\) 'nope'.*candidate cut tensors are a, d"):
        analysis.cut_for_tensors(["nope"])
    with pytest.raises(SliceError, match="other tensors cross the same position"):
        analysis.cut_for_tensors(["b"])
    assert [cut.crossing for cut in analysis.cut_for_tensors(["b", "c"])] == [("b", "c")]


def test_graph_tensor_without_batch_axis_is_not_a_cut():
    probe = _probe_for(_diamond(), rank_of={"a": ((8,), (12,))})  # batch folded into one dim
    analysis = GraphAnalysis(_diamond(), probe)
    assert [cut.crossing for cut in analysis.candidate_cuts()] == [("d",)]
    assert "no batch axis" in analysis.why_not_cuttable("a")


def test_partition_minimises_the_slowest_stage():
    part = partition_units([1, 1, 1, 1, 4, 1, 1], [0] * 6, 3)
    assert part.slowest_cost == 4
    assert part.stage_costs == (4, 4, 2) or part.slowest_cost == max(part.stage_costs)
    assert sum(part.stage_costs) == 10


def test_partition_prefers_small_boundaries_among_near_ties():
    # Cutting after unit 0 or unit 1 gives stages (1, 1.01) or (1.01, 1): within 2%; unit 1's cut is cheaper.
    part = partition_units([1.0, 0.01, 1.0], [100.0, 1.0], 2)
    assert part.cuts == (1,) and part.crossing_bytes == 1.0
    strict = partition_units([1.0, 0.01, 1.0], [100.0, 1.0], 2, tie_rtol=0.0)
    assert strict.slowest_cost == pytest.approx(1.01)


@settings(max_examples=150, deadline=None)
@given(costs=st.lists(st.integers(0, 20), min_size=1, max_size=7), data=st.data())
def test_partition_matches_brute_force(costs, data):
    stages = data.draw(st.integers(1, len(costs)))
    cut_bytes = data.draw(st.lists(st.integers(0, 9), min_size=len(costs) - 1, max_size=len(costs) - 1))
    part = partition_units([float(c) for c in costs], [float(b) for b in cut_bytes], stages, tie_rtol=0.0)
    best = None
    for cuts in itertools.combinations(range(len(costs) - 1), stages - 1):
        bounds = [0, *(c + 1 for c in cuts), len(costs)]
        slowest = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        key = (slowest, sum(cut_bytes[c] for c in cuts))
        best = key if best is None or key < best else best
    assert (part.slowest_cost, part.crossing_bytes) == best
    assert len(part.cuts) == stages - 1 and sum(part.stage_costs) == sum(costs)


def test_partition_single_stage_and_too_many_stages():
    assert partition_units([3.0, 2.0], [1.0], 1).stage_costs == (5.0,)
    with pytest.raises(SliceError, match="at least 3 units"):
        partition_units([1.0, 2.0], [1.0], 3)


def test_favoured_batch_size_stops_where_per_sample_time_flattens():
    latency = {1: 10.0, 2: 12.0, 4: 16.0, 8: 31.0, 16: 62.0}  # per sample: 10, 6, 4, 3.9, 3.9
    assert favoured_batch_size(latency) == 4
    assert favoured_batch_size({1: 1.0, 2: 1.0, 4: 1.0}) == 4  # keeps improving
    assert profile_batch_sizes(12) == [1, 2, 4, 8, 12]


def test_inputs_masks_have_real_lengths_and_ids_stay_in_range():
    specs = [InputSpec("ids", "int64", [-1, -1], (0, 7), 1, role="token_ids"),
             InputSpec("mask", "int64", [-1, -1], (0, 2), 1, role="attention_mask")]
    arrays = make_inputs(specs, 3, 6, rng=np.random.default_rng(0), lengths=[6, 2, 4])
    assert arrays["mask"].tolist() == [[1] * 6, [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert arrays["ids"].max() < 7 and (arrays["ids"][1, 2:] == 0).all()
    with pytest.raises(BadParameterError, match="lengths"):
        make_inputs(specs, 2, 6, lengths=[7, 1])


def test_inputs_inferred_from_a_model_with_an_embedding_table():
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
             helper.make_node("Mul", ["emb", "m3"], ["y"])]
    inits = [_weight("table", (30, 4)), numpy_helper.from_array(np.asarray([2], np.int64), "axis")]
    specs = {s.name: s for s in infer_input_specs(_model(nodes, [ids, mask], [y], inits))}
    assert specs["input_ids"].value_range == (0, 30) and specs["input_ids"].role == "token_ids"
    assert specs["input_ids"].sequence_axis == 1 and specs["input_ids"].shape == [-1, -1]
    assert specs["attention_mask"].role == "attention_mask"
