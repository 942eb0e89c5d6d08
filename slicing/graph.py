"""Graph analysis of an ONNX model for cutting it into a chain of stages.

Pure logic over a ``ModelProto`` and the concrete tensor shapes of two probe runs (:class:`ProbeShapes`):

- nodes in a topological order (the exporter's order when it is one: program order, layer by layer);
- each tensor classed ``const`` (initializers and what is computed from them alone), ``light`` (cheap
  bookkeeping over integer graph inputs and shapes: masks, position ids, shape vectors) or ``heavy``
  (activations); light and const tensors never cross a cut, the consuming stage recomputes them;
- the heavy tensors crossing each cut position, and the candidate cuts: positions crossed by the
  fewest heavy tensors, all of which carry the batch axis, grouped so that every stage computes
  something;
- the batch and sequence axis of every tensor, found empirically from two runs whose batch (2, 3)
  and sequence sizes (5, 7) differ, whatever the exporter named its dims.

The only I/O here is :func:`probe_shapes`, which runs the model once per probe with onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from backends.common.ort import make_session
from slicing.inputs import InputSpec, make_inputs
from core.errors import SliceError

if TYPE_CHECKING:
    import onnx

PROBE_BATCHES = (2, 3)
PROBE_SEQ_LENS = (5, 7)
SMALL_INITIALIZER_BYTES = 64 * 1024

# Cheap ops whose outputs are recomputed by any stage that needs them, as long as their inputs are
# const, light, or integer graph inputs (ids, masks, lengths).
LIGHT_OPS = frozenset({
    "Abs", "Add", "And", "Cast", "CastLike", "Ceil", "Clip", "Concat", "Constant", "ConstantOfShape",
    "CumSum", "Div", "Equal", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND",
    "Greater", "GreaterOrEqual", "Identity", "IsInf", "IsNaN", "Less", "LessOrEqual", "Max", "Min", "Mod",
    "Mul", "Neg", "Not", "NonZero", "Or", "Pow", "Range", "ReduceMax", "ReduceMin", "ReduceProd",
    "ReduceSum", "Reshape", "ScatterElements", "ScatterND", "Shape", "Sign", "Size", "Slice", "Split",
    "Sqrt", "Squeeze", "Sub", "Tile", "Transpose", "Trilu", "Unsqueeze", "Where", "Xor",
})
# Ops that only move or relabel data: a stage made of these alone does no work worth a stage.
MOVEMENT_OPS = frozenset({
    "Cast", "Concat", "Expand", "Flatten", "Identity", "Reshape", "Slice", "Split", "Squeeze",
    "Transpose", "Unsqueeze",
})

CONST, LIGHT, HEAVY = "const", "light", "heavy"


@dataclass
class ProbeShapes:
    """Concrete shape and dtype of every tensor in two runs with different batch (and sequence) sizes."""

    batch_sizes: tuple[int, int]
    seq_lens: tuple[int, int] | None
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    dtypes: dict[str, str]

    def axis_with_sizes(self, name: str, sizes: tuple[int, int]) -> int | None:
        """The single axis of ``name`` whose size is ``sizes[0]`` then ``sizes[1]``; None if none or several."""
        if name not in self.shapes:
            return None
        first, second = self.shapes[name]
        if len(first) != len(second):
            return None
        axes = [axis for axis, (a, b) in enumerate(zip(first, second)) if (a, b) == sizes]
        return axes[0] if len(axes) == 1 else None

    def batch_axis(self, name: str) -> int | None:
        if self.batch_sizes[0] == self.batch_sizes[1]:
            return None  # a model served without batching: no batch axis anywhere
        return self.axis_with_sizes(name, self.batch_sizes)

    def sequence_axis(self, name: str) -> int | None:
        return None if self.seq_lens is None else self.axis_with_sizes(name, self.seq_lens)

    def bytes_per_sample(self, name: str) -> float:
        first, _ = self.shapes[name]
        return float(np.prod(first, dtype=np.float64)) * np.dtype(self.dtypes[name]).itemsize / self.batch_sizes[0]


@dataclass(frozen=True)
class CutPoint:
    """A position between node ``position - 1`` and ``position`` of the topological order."""

    position: int
    crossing: tuple[str, ...]  # heavy tensors produced before the cut and used after it, in producer order
    bytes_per_sample: float  # of the crossing tensors, at the probe's first sequence length


@dataclass
class GraphAnalysis:
    """Lookup tables, tensor classes, crossing sets and candidate cuts of one model."""

    model: onnx.ModelProto
    probe: ProbeShapes | None = None
    nodes: list = field(init=False)
    producer: dict[str, int] = field(init=False)  # tensor -> index of the node producing it
    consumers: dict[str, list[int]] = field(init=False)
    initializers: set[str] = field(init=False)
    graph_inputs: list[str] = field(init=False)
    graph_outputs: list[str] = field(init=False)
    kinds: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        graph = self.model.graph
        self.initializers = {init.name for init in graph.initializer}
        self.graph_inputs = [v.name for v in graph.input if v.name not in self.initializers]
        self.graph_outputs = [v.name for v in graph.output]
        self.nodes = topological_order(graph)
        self.producer, self.consumers = {}, {}
        for index, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = index
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(index)
        self.kinds = self._classify()

    # ---- tensor classes --------------------------------------------------------------------
    def _classify(self) -> dict[str, str]:
        graph = self.model.graph
        init_bytes = {init.name: _initializer_bytes(init) for init in graph.initializer}
        input_types = {v.name: v.type.tensor_type.elem_type for v in graph.input}
        kinds: dict[str, str] = {name: CONST for name in self.initializers}
        for name in self.graph_inputs:
            # Integer inputs (ids, masks, lengths) feed bookkeeping; float inputs are data.
            kinds[name] = LIGHT if input_types.get(name) in _INTEGER_ONNX_TYPES else HEAVY
        for node in self.nodes:
            inputs = [name for name in node.input if name]
            input_kinds = [kinds.get(name, CONST) for name in inputs]
            if all(kind == CONST for kind in input_kinds) and node.op_type not in _RANDOM_OPS:
                kind = CONST
            elif node.op_type in ("Shape", "Size") and inputs and inputs[0] in self.graph_inputs:
                kind = LIGHT  # metadata of an input that every stage can read
            elif (node.op_type in LIGHT_OPS and all(kind != HEAVY for kind in input_kinds)
                  and not self._is_table_lookup(node, init_bytes)):
                kind = LIGHT
            else:
                kind = HEAVY
            for name in node.output:
                if name:
                    kinds[name] = kind
        return kinds

    def _is_table_lookup(self, node, init_bytes: dict[str, int]) -> bool:
        """An embedding lookup (Gather from a 2-D+ weight table) is real work, whatever the table's size."""
        if node.op_type != "Gather" or not node.input:
            return False
        table = next((i for i in self.model.graph.initializer if i.name == node.input[0]), None)
        return table is not None and (len(table.dims) >= 2 or init_bytes[table.name] > SMALL_INITIALIZER_BYTES)

    def is_compute_node(self, index: int) -> bool:
        """Whether the node does real work: produces a heavy tensor and is not a pure data move."""
        node = self.nodes[index]
        return (node.op_type not in MOVEMENT_OPS
                and any(self.kinds.get(name) == HEAVY for name in node.output if name))

    # ---- crossing sets ---------------------------------------------------------------------
    def last_use(self, name: str) -> int:
        """Index of the last node using ``name``; graph outputs count as used after the last node."""
        if name in self.graph_outputs:
            return len(self.nodes)
        return max(self.consumers.get(name, [-1]))

    def crossing_sets(self) -> list[list[str]]:
        """Heavy tensors crossing each position 0..N (position k: between node k-1 and node k)."""
        count = len(self.nodes)
        intervals = []
        for name, producer in self.producer.items():
            if self.kinds.get(name) != HEAVY:
                continue
            last = self.last_use(name)
            if last > producer:
                intervals.append((producer + 1, last, name))  # crosses positions producer+1 .. last
        crossing: list[list[str]] = [[] for _ in range(count + 1)]
        for first, last, name in intervals:
            for position in range(first, last + 1):
                crossing[position].append(name)
        for names in crossing:
            names.sort(key=lambda n: self.producer[n])
        return crossing

    def valid_cuts(self) -> list[CutPoint]:
        """Positions 1..N-1 whose crossing tensors all carry a batch axis (needs a probe)."""
        if self.probe is None:
            raise SliceError("internal: cut analysis needs the probe shapes of the model")
        crossing = self.crossing_sets()
        batched = self.probe.batch_sizes[0] != self.probe.batch_sizes[1]
        cuts = []
        for position in range(1, len(self.nodes)):
            names = crossing[position]
            if not names or (batched and any(self.probe.batch_axis(name) is None for name in names)):
                continue
            cuts.append(CutPoint(position, tuple(names), sum(self.probe.bytes_per_sample(n) for n in names)))
        return cuts

    def candidate_cuts(self) -> list[CutPoint]:
        """The cuts a partition may use, in order.

        Only positions crossed by the minimum number of heavy tensors count. Runs of them with no
        compute node in between are equivalent for balancing, so each run keeps one position: the
        smallest crossing bytes, batch-first tensors (no boundary Transpose), earliest. A cut is kept
        only if the stages on both sides compute something.
        """
        cuts = self.valid_cuts()
        if not cuts:
            return []
        fewest = min(len(cut.crossing) for cut in cuts)
        cuts = [cut for cut in cuts if len(cut.crossing) == fewest]
        compute_before = np.cumsum([0] + [int(self.is_compute_node(i)) for i in range(len(self.nodes))])

        def compute_between(start: int, stop: int) -> int:  # compute nodes with index in [start, stop)
            return int(compute_before[stop] - compute_before[start])

        groups: list[list[CutPoint]] = []
        for cut in cuts:
            if groups and compute_between(groups[-1][-1].position, cut.position) == 0:
                groups[-1].append(cut)
            else:
                groups.append([cut])
        chosen = [min(group, key=lambda c: (c.bytes_per_sample, self._transposes(c), c.position))
                  for group in groups]
        kept: list[CutPoint] = []
        previous = 0
        for cut in chosen:
            if compute_between(previous, cut.position) > 0:
                kept.append(cut)
                previous = cut.position
        while kept and compute_between(kept[-1].position, len(self.nodes)) == 0:
            kept.pop()
        return kept

    def _transposes(self, cut: CutPoint) -> int:
        return sum(1 for name in cut.crossing if self.probe.batch_axis(name) not in (0, None))

    def cut_for_tensors(self, names: list[str]) -> list[CutPoint]:
        """Cut points whose crossing set is made of the given tensors only, one per distinct set."""
        known = set(self.producer) | set(self.graph_inputs) | self.initializers
        unknown = [name for name in names if name not in known]
        if unknown:
            raise SliceError(
                f"unknown cut tensor(s) {', '.join(map(repr, unknown))}: not a tensor of the model; "
                f"candidate cut tensors are {self.describe_candidates()}")
        wanted = set(names)
        by_set: dict[tuple[str, ...], CutPoint] = {}
        for cut in self.valid_cuts():
            if set(cut.crossing) <= wanted and cut.crossing not in by_set:
                by_set[cut.crossing] = cut
        covered = {name for crossing in by_set for name in crossing}
        missing = [name for name in names if name not in covered]
        if missing:
            reasons = [f"{name!r} ({self.why_not_cuttable(name)})" for name in missing]
            raise SliceError(
                f"cannot cut at tensor(s) {', '.join(reasons)}; candidate cut tensors are "
                f"{self.describe_candidates()}")
        return sorted(by_set.values(), key=lambda cut: cut.position)

    def why_not_cuttable(self, name: str) -> str:
        kind = self.kinds.get(name)
        if name in self.graph_inputs or name in self.initializers:
            return "a graph input or initializer, available to every stage"
        if kind != HEAVY:
            return f"a {kind} tensor, recomputed by each stage instead of crossing"
        if self.probe is not None and self.probe.batch_axis(name) is None:
            return "it has no batch axis"
        return "other tensors cross the same position; list them too"

    def describe_candidates(self, limit: int = 8) -> str:
        candidates = self.candidate_cuts() if self.probe is not None else []
        names = [" + ".join(cut.crossing) for cut in candidates]
        shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
        return shown or "none"


_INTEGER_ONNX_TYPES = {2, 3, 4, 5, 6, 7, 9, 12, 13}  # uint8 int8 uint16 int16 int32 int64 bool uint32 uint64
_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
               "Bernoulli"}


def _initializer_bytes(init) -> int:
    from onnx import helper

    count = int(np.prod(init.dims, dtype=np.int64)) if init.dims else 1
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    except Exception:  # noqa: BLE001 - exotic types: assume 4 bytes
        itemsize = 4
    return count * itemsize


def topological_order(graph) -> list:
    """The graph's nodes in a topological order: the stored order when valid, else a stable Kahn sort."""
    available = {init.name for init in graph.initializer} | {v.name for v in graph.input} | {""}
    produced_later = {name for node in graph.node for name in node.output}
    in_order = True
    seen = set(available)
    for node in graph.node:
        if any(name not in seen and name in produced_later for name in node.input):
            in_order = False
            break
        seen.update(node.output)
    if in_order:
        return list(graph.node)
    # Kahn's algorithm, taking ready nodes in their stored order.
    nodes = list(graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output}
    waiting = [sum(1 for name in set(n.input) if name in producer) for n in nodes]
    users: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in set(node.input):
            if name in producer:
                users.setdefault(producer[name], []).append(i)
    import heapq

    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for user in users.get(i, []):
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):
        raise SliceError("the model graph has a cycle; it is not a valid ONNX model")
    return order


# ---------------------------------------------------------------------------------------------
# Shape rebuilds: Shape(activation) -> the same vector computed from graph-input shapes
# ---------------------------------------------------------------------------------------------


def input_dim_sources(probe: ProbeShapes, graph_inputs: list[str]) -> dict[tuple[int, int], tuple[str, int]]:
    """Probe size pairs that identify a graph-input axis, e.g. (2, 3) -> ("images", 0)."""
    sources: dict[tuple[int, int], tuple[str, int]] = {}

    def preference(name: str) -> tuple[bool, float]:  # integer inputs (ids, masks) fan out anyway; small first
        dtype = np.dtype(probe.dtypes[name])
        return (not np.issubdtype(dtype, np.integer), float(np.prod(probe.shapes[name][0])))

    for name in sorted(graph_inputs, key=preference):
        first, second = probe.shapes[name]
        for axis, (a, b) in enumerate(zip(first, second)):
            if a != b:
                sources.setdefault((a, b), (name, axis))
    return sources


def rebuild_activation_shapes(model: onnx.ModelProto, probe: ProbeShapes) -> tuple[onnx.ModelProto, int]:
    """Replace ``Shape(heavy tensor)`` by the same vector built from graph-input shapes.

    Every dim of the tensor must be static in both probes or equal to a graph-input axis in both
    (batch, sequence). Such a shape vector becomes light, so it never forces its activation to cross
    a cut (TorchScript BERT's mask code reads ``Shape(embeddings)``; the dynamo LSTM reshapes through
    ``Shape(lstm output)``). Returns the new model and the number of nodes rewritten.
    """
    import onnx

    analysis = GraphAnalysis(model)
    sources = input_dim_sources(probe, analysis.graph_inputs)
    new_nodes, new_inits = [], []
    rewritten = 0
    for node in analysis.nodes:
        source = node.input[0] if node.op_type == "Shape" and node.input else None
        if source is None or analysis.kinds.get(source) != HEAVY or source in analysis.graph_inputs \
                or source not in probe.shapes:
            new_nodes.append(node)
            continue
        pieces = dim_pieces(probe, source, sources)
        if pieces is None:
            new_nodes.append(node)
            continue
        pieces = _sliced_pieces(node, pieces)
        nodes, inits = shape_rebuild_nodes(node.output[0], pieces)
        new_nodes.extend(nodes)
        new_inits.extend(inits)
        rewritten += 1
    if not rewritten:
        return model, 0
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend(new_nodes)
    result.graph.initializer.extend(new_inits)
    return result, rewritten


def _sliced_pieces(node, pieces: list) -> list:
    """The part of the dims a Shape node returns (its start/end attributes, opset >= 15)."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    rank = len(pieces)
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
    return pieces[max(0, min(start, rank)):max(0, min(end, rank))]


def shape_rebuild_nodes(out: str, pieces: list[int | tuple[str, int]]) -> tuple[list, list]:
    """Nodes computing the int64 shape vector ``out`` from static dims and (tensor, axis) dims.

    Uses only Shape, Gather, Concat and Identity with attributes valid since opset 1-4, so it fits
    old user models (opset 9) as well as current exports.
    """
    from onnx import helper, numpy_helper

    prefix = f"{out}__rebuilt"
    nodes, inits, concat_inputs, statics = [], [], [], []

    def flush_statics() -> None:
        if statics:
            name = f"{prefix}_c{len(concat_inputs)}"
            inits.append(numpy_helper.from_array(np.asarray(statics, dtype=np.int64), name))
            concat_inputs.append(name)
            statics.clear()

    for piece in pieces:
        if isinstance(piece, (int, np.integer)):
            statics.append(int(piece))
            continue
        flush_statics()
        source, axis = piece
        tag = len(concat_inputs)
        shape_name, index_name, dim_name = f"{prefix}_shape{tag}", f"{prefix}_i{tag}", f"{prefix}_d{tag}"
        inits.append(numpy_helper.from_array(np.asarray([axis], dtype=np.int64), index_name))
        nodes.append(helper.make_node("Shape", [source], [shape_name], name=shape_name))
        nodes.append(helper.make_node("Gather", [shape_name, index_name], [dim_name], axis=0, name=dim_name))
        concat_inputs.append(dim_name)
    flush_statics()
    if not concat_inputs:  # a rank-0 tensor, or an empty slice
        empty = f"{prefix}_empty"
        inits.append(numpy_helper.from_array(np.zeros([0], dtype=np.int64), empty))
        concat_inputs.append(empty)
    if len(concat_inputs) == 1:
        nodes.append(helper.make_node("Identity", concat_inputs, [out], name=f"{prefix}_identity"))
    else:
        nodes.append(helper.make_node("Concat", concat_inputs, [out], axis=0, name=f"{prefix}_concat"))
    return nodes, inits


def dim_pieces(probe: ProbeShapes, name: str, sources: dict[tuple[int, int], tuple[str, int]]
               ) -> list[int | tuple[str, int]] | None:
    """Each dim of ``name``: static size, or the (tensor, axis) it equals in both probes; None if neither."""
    first, second = probe.shapes[name]
    pieces: list[int | tuple[str, int]] = []
    for a, b in zip(first, second):
        if a == b:
            pieces.append(int(a))
        elif (a, b) in sources:
            pieces.append(sources[(a, b)])
        else:
            return None
    return pieces


# ---------------------------------------------------------------------------------------------
# Probing (I/O: onnxruntime)
# ---------------------------------------------------------------------------------------------


def expose_all_tensors(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of the model whose outputs are every node output (types left for ORT to infer)."""
    import onnx

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    names, seen = [], set()
    for node in exposed.graph.node:
        for name in node.output:
            if name and name not in seen:
                seen.add(name)
                names.append(name)
    del exposed.graph.output[:]
    for name in names:
        exposed.graph.output.append(onnx.ValueInfoProto(name=name))
    return exposed, names


def probe_shapes(model: onnx.ModelProto, specs: list[InputSpec], *, batchable: bool = True,
                 intra_op_threads: int = 1) -> tuple[ProbeShapes, dict[str, dict[str, np.ndarray]]]:
    """Run the model twice (batch 2 then 3, sequence 5 then 7) with every tensor exposed.

    Returns the probe shapes and the graph inputs and outputs of each run (for comparisons).
    """
    exposed, names = expose_all_tensors(model)
    session = make_session(exposed, intra_op_threads=intra_op_threads, optimize=False)
    has_sequence = any(spec.sequence_axis is not None for spec in specs)
    fixed = next((s.shape[0] for s in specs if s.shape and s.shape[0] != -1), 1)
    batches = PROBE_BATCHES if batchable else (fixed, fixed)
    seq_lens = PROBE_SEQ_LENS if has_sequence else (None, None)
    runs = []
    for probe_index, (batch, seq_len) in enumerate(zip(batches, seq_lens)):
        feeds = make_inputs(specs, batch, seq_len, rng=np.random.default_rng(probe_index))
        try:
            values = session.run(names, feeds)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises plain RuntimeErrors
            raise SliceError(
                f"the model failed to run on valid inputs (batch {batch}, seq {seq_len}): "
                f"{_first_line(error)}; check the input specs") from None
        runs.append((feeds, dict(zip(names, values))))
    shapes, dtypes = {}, {}
    for name in list(runs[0][0]) + names:
        first = runs[0][0].get(name, runs[0][1].get(name))
        second = runs[1][0].get(name, runs[1][1].get(name))
        shapes[name] = (tuple(np.shape(first)), tuple(np.shape(second)))
        dtypes[name] = np.asarray(first).dtype.name
    probe = ProbeShapes(batch_sizes=batches, seq_lens=PROBE_SEQ_LENS if has_sequence else None,
                        shapes=shapes, dtypes=dtypes)
    outputs = [name for name in (v.name for v in model.graph.output)]
    samples = [{**feeds, **{name: values[name] for name in outputs}} for feeds, values in runs]
    return probe, {"first": samples[0], "second": samples[1]}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
