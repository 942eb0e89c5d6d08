"""The repository the compose `builder` service writes (`stagebatch build --target gpu`) is valid for Triton.

Triton's onnxruntime backend is not in the local server, so the GPU repository cannot be loaded
here; instead every ``config.pbtxt`` is parsed strictly with Triton's ModelConfig protobuf
schema (tritonclient's ``model_config_pb2``; an unknown field or a bad enum fails), and the
repository's cross references (ensemble steps, files, manifest variants) are checked. The builder
runs with the compose file's own arguments, only smaller: tiny models, written to a temporary
directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from test_compose_config import load_compose

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpu-repository")
    builder = load_compose({"STAGEBATCH_BUILD_SIZE": "tiny"})["services"]["builder"]
    command = builder["command"]
    assert command[:2] == ["stagebatch", "build"] and "--out=/models" in command
    assert dict(builder_mount.split(":")[:2][::-1] for builder_mount in builder["volumes"])["/models"]
    args = [f"--out={out}" if arg == "--out=/models" else arg for arg in command[2:]]
    result = subprocess.run(
        [sys.executable, "-m", "stagebatch.cli", "build", *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(), config)  # strict: unknown fields and bad enum values raise
    return config


def test_builder_command_targets_gpu_with_the_whole_zoo() -> None:
    command = load_compose()["services"]["builder"]["command"]
    assert "--target=gpu" in command
    assert "--model=all" in command and "--size=full" in command


def test_every_config_is_a_valid_triton_model_config(gpu_repository: Path) -> None:
    configs = sorted(gpu_repository.glob("*/config.pbtxt"))
    assert len(configs) == 3 * 7, [str(path) for path in configs]  # 3 models x (whole + 4 stages + ensemble + reorch)
    for path in configs:
        config = parse_config(path)
        assert config.name == path.parent.name, f"{path}: name {config.name!r} differs from its directory"
        assert config.max_batch_size == 32, f"{path}: the compose default --max-batch is 32"


def test_onnx_models_run_on_the_gpu_with_the_onnxruntime_backend(gpu_repository: Path) -> None:
    manifest = json.loads((gpu_repository / "manifest.json").read_text())
    assert manifest["target"] == "gpu"
    assert set(manifest["models"]) == {"resnet50", "bert_base", "lstm"}
    for name, entry in manifest["models"].items():
        onnx_models = [entry["variants"]["whole"], *(stage["model_name"] for stage in entry["stages"])]
        for model in onnx_models:
            config = parse_config(gpu_repository / model / "config.pbtxt")
            assert config.backend == "onnxruntime", f"{model}: backend {config.backend!r}"
            assert [group.kind for group in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
            assert config.HasField("dynamic_batching")
            assert (gpu_repository / model / "1" / "model.onnx").is_file()
        for stage in entry["stages"]:
            assert (gpu_repository / stage["onnx"]).is_file(), stage["onnx"]


def test_ensembles_chain_existing_stage_models_by_tensor_name(gpu_repository: Path) -> None:
    manifest = json.loads((gpu_repository / "manifest.json").read_text())
    for name, entry in manifest["models"].items():
        ensemble = parse_config(gpu_repository / entry["variants"]["ensemble"] / "config.pbtxt")
        assert ensemble.platform == "ensemble"
        steps = [step.model_name for step in ensemble.ensemble_scheduling.step]
        assert steps == [stage["model_name"] for stage in entry["stages"]]
        available = {tensor.name for tensor in ensemble.input}
        for step in ensemble.ensemble_scheduling.step:
            stage = parse_config(gpu_repository / step.model_name / "config.pbtxt")
            assert stage.max_batch_size >= ensemble.max_batch_size
            assert set(step.input_map) == {tensor.name for tensor in stage.input}
            assert set(step.input_map.values()) <= available, f"{step.model_name} reads a tensor nobody wrote"
            available |= set(step.output_map.values())
        assert {tensor.name for tensor in ensemble.output} <= available


def test_python_models_are_self_contained(gpu_repository: Path) -> None:
    # The Triton image has no stagebatch package: each Python model carries backends/ beside model.py.
    python_models = [
        path.parent for path in gpu_repository.glob("*/config.pbtxt") if parse_config(path).backend == "python"
    ]
    assert sorted(model.name for model in python_models) == ["bert_base_reorch", "lstm_reorch", "resnet50_reorch"]
    for model_dir in python_models:
        config = parse_config(model_dir / "config.pbtxt")
        assert not config.model_transaction_policy.decoupled  # answered later through the response sender
        assert [group.kind for group in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
        version = model_dir / "1"
        assert (version / "model.py").is_file(), model_dir.name
        assert (version / "backends" / "__init__.py").is_file(), model_dir.name


def test_config_parsing_is_strict(tmp_path: Path) -> None:
    bad = tmp_path / "config.pbtxt"
    bad.write_text('name: "m"\nbackend: "onnxruntime"\ninstance_group { kind: KIND_TPU }\n')
    with pytest.raises(text_format.ParseError):
        parse_config(bad)
    bad.write_text('name: "m"\nmax_batch_size: 8\nmax_queue_delay: 100\n')
    with pytest.raises(text_format.ParseError):
        parse_config(bad)


# ---- the Locust services, configured as in docker-compose.yml, against the builder's manifest ----

# Run in a fresh interpreter: importing the locustfile attaches listeners to Locust's global events.
# Top-level modules the loadtest image does not install are blocked, so an import the image would
# miss fails here too.
_LOCUST_PROBE = r"""
import importlib.abc, json, os, sys

blocked = set(json.loads(sys.argv[1]))

class NotInImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is not installed in the loadtest image (docker/loadtest-requirements.txt)")
        return None

sys.meta_path.insert(0, NotInImage())
os.environ.update(json.loads(sys.argv[2]))
import loadtest.locustfile as locustfile
from locust.argument_parser import parse_options

options = parse_options(args=json.loads(sys.argv[3]))
result = {"master": options.master, "worker": options.worker, "host": options.host,
          "master_host": options.master_host, "headless": options.headless, "users": options.num_users}
if options.master:
    plan = locustfile.plan_from_options(options, options.host)
    result["plan"] = json.loads(plan.to_json())
print(json.dumps(result))
"""


def _distribution_closure(requirements: list[str]) -> set[str]:
    """Normalized names of the given distributions and everything they require (installed metadata)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    pending = [(Requirement(text), "") for text in requirements]
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        for wanted_extra in [*requirement.extras, ""]:
            key = f"{name}[{wanted_extra}]"
            if key in seen:
                continue
            seen.add(key)
            for text in metadata.requires(requirement.name) or []:
                pending.append((Requirement(text), wanted_extra))
    return {key.split("[")[0] for key in seen}


def _modules_outside_the_loadtest_image() -> list[str]:
    from importlib import metadata

    from packaging.utils import canonicalize_name

    lines = [line.split("#")[0].strip() for line in (ROOT / "docker" / "loadtest-requirements.txt").read_text().splitlines()]
    allowed = _distribution_closure([line for line in lines if line])
    project_packages = {"core", "stagebatch", "loadtest", "slicing", "backends"}
    return sorted(
        module
        for module, distributions in metadata.packages_distributions().items()
        if module not in project_packages
        and module not in sys.stdlib_module_names
        and not any(canonicalize_name(name) in allowed for name in distributions)
    )


def _run_locust_probe(environment: dict[str, str], command: list[str]) -> dict:
    assert command[0] == "locust"
    blocked = _modules_outside_the_loadtest_image()
    assert {"torch", "onnx", "transformers", "matplotlib"} <= set(blocked), "the probe must block the heavy packages"
    result = subprocess.run(
        [sys.executable, "-c", _LOCUST_PROBE, json.dumps(blocked), json.dumps(environment), json.dumps(command[1:])],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_locust_master_as_composed_plans_a_run_from_the_builders_manifest(gpu_repository: Path) -> None:
    master = load_compose()["services"]["locust-master"]
    environment = {key: str(value) for key, value in master["environment"].items()}
    # The master reads the manifest where the repository is mounted; here, the tiny build.
    mounted = dict(mount.split(":")[:2][::-1] for mount in master["volumes"])
    assert environment["STAGEBATCH_MANIFEST"] == "/models/manifest.json" and "/models" in mounted
    environment["STAGEBATCH_MANIFEST"] = str(gpu_repository / "manifest.json")
    parsed = _run_locust_probe(environment, master["command"])
    assert parsed["master"] and not parsed["worker"] and not parsed["headless"]
    assert parsed["users"] == 16
    plan = parsed["plan"]
    assert plan["grpc_url"] == "triton:8001" and plan["target"] == "gpu"
    assert plan["spec"]["model"] == "resnet50" and plan["spec"]["variant"] == "whole"


def test_locust_master_headless_and_workers_as_composed(gpu_repository: Path) -> None:
    compose = load_compose({"LOCUST_HEADLESS": "true", "LOCUST_USERS": "64", "STAGEBATCH_VARIANT": "ensemble",
                            "STAGEBATCH_MODEL": "bert_base", "STAGEBATCH_LENGTHS": "uniform:min_length=4,max_length=16"})
    master = compose["services"]["locust-master"]
    environment = {key: str(value) for key, value in master["environment"].items()}
    environment["STAGEBATCH_MANIFEST"] = str(gpu_repository / "manifest.json")
    parsed = _run_locust_probe(environment, master["command"])
    assert parsed["headless"] and parsed["users"] == 64
    assert parsed["plan"]["spec"]["model"] == "bert_base" and parsed["plan"]["spec"]["variant"] == "ensemble"

    worker = compose["services"]["locust-worker"]
    assert "environment" not in worker and "volumes" not in worker, "workers get the plan from the master"
    parsed = _run_locust_probe({}, worker["command"])
    assert parsed["worker"] and not parsed["master"] and parsed["master_host"] == "locust-master"


# ---- docker/full-gpu.yaml: the full characterization against the composed Triton ----


def test_gpu_plan_runs_against_a_remote_triton_on_the_builders_repository(gpu_repository: Path) -> None:
    from loadtest.plan import load_plan
    from slicing.zoo import ZOO

    plan = load_plan(str(ROOT / "docker" / "full-gpu.yaml"))
    compose = load_compose()
    builder = compose["services"]["builder"]
    # The plan reads the manifest the builder wrote (the same directory Triton mounts) and never
    # rebuilds: a --url run cannot rebuild models on the server's machine.
    repository_mount = next(m.split(":")[0] for m in builder["volumes"] if m.split(":")[1] == "/models")
    assert plan.repository.build is False
    assert Path(plan.repository.path) == Path(repository_mount)
    assert plan.repository.target == "gpu"
    max_batch = int(next(a.split("=")[1] for a in builder["command"] if a.startswith("--max-batch=")))
    assert plan.repository.max_batch_size == max_batch
    points = plan.points()
    assert points and not any(point.slicing for point in points), "slicing sweeps need the embedded server"
    manifest = json.loads((gpu_repository / "manifest.json").read_text())
    for point in points:
        entry = manifest["models"].get(point.model)
        assert entry is not None, f"{point.point_id}: the builder does not build {point.model}"
        assert point.variant in entry["variants"], f"{point.point_id}: no {point.variant} variant"
        if point.lengths:
            # The builder keeps `stagebatch build`'s default sequence bound for the full models.
            size = next(a.split("=")[1] for a in builder["command"] if a.startswith("--size="))
            limit = ZOO[point.model].architectures[size]["default_seq_len"]
            assert point.lengths["max_length"] <= limit, f"{point.point_id}: lengths beyond {limit}"
        for knob, value in point.batching.to_mapping().items():
            if knob == "max_batch_size":
                assert value <= max_batch, f"{point.point_id}: max_batch_size {value} > the built {max_batch}"
