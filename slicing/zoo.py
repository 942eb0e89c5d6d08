"""The model zoo: three structurally different DNNs in plain PyTorch, with seeded random weights.

- ``resnet50``: a CNN in the torchvision ResNet-50 layout (bottleneck blocks), input ``images``.
- ``bert_base``: a Transformer encoder (``transformers.BertModel``), inputs ``input_ids`` and
  ``attention_mask``, outputs ``last_hidden_state`` and ``pooler_output``.
- ``lstm``: embedding + 2-layer unidirectional LSTM + per-step linear head, input ``tokens``,
  output ``logits`` ``[B, S, C]``.

Each comes in sizes ``full`` (the real architecture), ``small`` (same structure, several times
cheaper, for characterization on a 2-core CPU) and ``tiny`` (tests). Nothing is downloaded: weights
are drawn from ``torch.manual_seed(seed)``, or loaded from a local state dict (``weights=FILE``).

Every output with a sequence axis is padding-safe: its valid prefix does not depend on right
padding (BERT masks padded keys; the LSTM is unidirectional and emits one output per step).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from slicing.inputs import InputSpec, make_inputs
from core.errors import BadParameterError

if TYPE_CHECKING:
    import torch

SIZES = ("tiny", "small", "full")


@dataclass(frozen=True)
class OutputSpec:
    """One model output: what the manifest and the repository configs need to know."""

    name: str
    dtype: str  # numpy dtype name
    shape: list[int]  # batch first, -1 = dynamic
    sequence_axis: int | None = None


@dataclass(frozen=True)
class SequenceInfo:
    """The sequence axis of a sequence model: valid lengths and the length used by default."""

    max_length: int
    default_length: int
    min_length: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_length <= self.default_length <= self.max_length:
            raise BadParameterError(
                f"sequence lengths must satisfy 1 <= min ({self.min_length}) <= default "
                f"({self.default_length}) <= max ({self.max_length})")


@dataclass
class ZooModel:
    """A zoo model ready to export: the module (eval mode) and everything known about its I/O."""

    name: str
    family: str  # cnn | bert | lstm
    size: str  # tiny | small | full
    module: torch.nn.Module
    input_specs: list[InputSpec]
    outputs: list[OutputSpec]
    sequence: SequenceInfo | None
    architecture: dict[str, Any]
    seed: int = 0
    weights_path: Path | None = None
    weights_sha256: str | None = None  # of the --weights file; part of the export cache key
    parameter_count: int = field(init=False)

    def __post_init__(self) -> None:
        self.parameter_count = sum(p.numel() for p in self.module.parameters())

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.input_specs]

    @property
    def output_names(self) -> list[str]:
        return [output.name for output in self.outputs]

    @property
    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def example_inputs(self, batch: int = 2, seq_len: int | None = None, seed: int = 0) -> tuple:
        """Random valid inputs as torch tensors, in forward() order (attention masks all ones)."""
        import torch

        if self.sequence is not None and seq_len is None:
            seq_len = min(self.sequence.default_length, 11)
        arrays = make_inputs(self.input_specs, batch, seq_len, rng=np.random.default_rng(seed))
        return tuple(torch.from_numpy(np.ascontiguousarray(arrays[name])) for name in self.input_names)

    def dynamic_shapes(self, max_batch: int = 4096) -> dict[str, dict[int, Any]]:
        """``torch.onnx.export`` dynamic shapes: batch (dim 0) and, for sequence models, the sequence."""
        import torch

        batch = torch.export.Dim("batch", min=1, max=max_batch)
        shapes: dict[str, dict[int, Any]] = {}
        seq = None
        if self.sequence is not None:
            seq = torch.export.Dim("seq", min=1, max=self.sequence.max_length)
        for spec in self.input_specs:
            dims: dict[int, Any] = {0: batch}
            if spec.sequence_axis is not None and seq is not None:
                dims[spec.sequence_axis] = seq
            shapes[spec.name] = dims
        return shapes


# ---------------------------------------------------------------------------------------------
# Modules (torch is imported lazily so that `stagebatch --help` stays fast)
# ---------------------------------------------------------------------------------------------


def resnet_module(arch: dict[str, Any]) -> torch.nn.Module:
    from torch import nn

    class Bottleneck(nn.Module):
        """torchvision's ResNet v1.5 bottleneck: stride on the 3x3 conv, expansion 4."""

        expansion = 4

        def __init__(self, inplanes: int, planes: int, stride: int = 1):
            super().__init__()
            out = planes * self.expansion
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(out)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or inplanes != out:
                self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                                nn.BatchNorm2d(out))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return self.relu(y + identity)

    class ResNet(nn.Module):
        def __init__(self, blocks: list[int], width: int, num_classes: int):
            super().__init__()
            self.inplanes = width
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            self.layer1 = self._make_layer(width, blocks[0], 1)
            self.layer2 = self._make_layer(width * 2, blocks[1], 2)
            self.layer3 = self._make_layer(width * 4, blocks[2], 2)
            self.layer4 = self._make_layer(width * 8, blocks[3], 2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(width * 8 * Bottleneck.expansion, num_classes)
            for m in self.modules():  # torchvision's initialisation
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

        def _make_layer(self, planes: int, count: int, stride: int) -> nn.Sequential:
            layers = [Bottleneck(self.inplanes, planes, stride)]
            self.inplanes = planes * Bottleneck.expansion
            layers += [Bottleneck(self.inplanes, planes) for _ in range(1, count)]
            return nn.Sequential(*layers)

        def forward(self, images):
            x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.avgpool(x).flatten(1))

    return ResNet(arch["blocks"], arch["width"], arch["num_classes"])


def bert_module(arch: dict[str, Any]) -> torch.nn.Module:
    from torch import nn
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=arch["vocab"], hidden_size=arch["hidden"], num_hidden_layers=arch["layers"],
        num_attention_heads=arch["heads"], intermediate_size=arch["intermediate"],
        max_position_embeddings=arch["max_positions"])

    class Bert(nn.Module):
        """``BertModel`` taking ``(input_ids, attention_mask)`` and returning plain tensors."""

        def __init__(self):
            super().__init__()
            self.bert = BertModel(config)

        def forward(self, input_ids, attention_mask):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    return Bert()


def lstm_module(arch: dict[str, Any]) -> torch.nn.Module:
    from torch import nn

    class LstmTagger(nn.Module):
        """Embedding, stacked unidirectional LSTM, one linear head per step: ``[B, S] -> [B, S, C]``."""

        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(arch["vocab"], arch["embedding"])
            self.lstm = nn.LSTM(arch["embedding"], arch["hidden"], num_layers=arch["layers"],
                                batch_first=True)
            self.head = nn.Linear(arch["hidden"], arch["num_classes"])

        def forward(self, tokens):
            hidden, _ = self.lstm(self.embedding(tokens))
            return self.head(hidden)

    return LstmTagger()


def resnet_io(arch: dict[str, Any]) -> tuple[list[InputSpec], list[OutputSpec]]:
    r = arch["resolution"]
    return ([InputSpec("images", "float32", [-1, 3, r, r])],
            [OutputSpec("logits", "float32", [-1, arch["num_classes"]])])


def bert_io(arch: dict[str, Any]) -> tuple[list[InputSpec], list[OutputSpec]]:
    return ([InputSpec("input_ids", "int64", [-1, -1], value_range=(0, arch["vocab"]),
                       sequence_axis=1, pad_value=0, role="token_ids"),
             InputSpec("attention_mask", "int64", [-1, -1], value_range=(0, 2),
                       sequence_axis=1, pad_value=0, role="attention_mask")],
            [OutputSpec("last_hidden_state", "float32", [-1, -1, arch["hidden"]], sequence_axis=1),
             OutputSpec("pooler_output", "float32", [-1, arch["hidden"]])])


def lstm_io(arch: dict[str, Any]) -> tuple[list[InputSpec], list[OutputSpec]]:
    return ([InputSpec("tokens", "int64", [-1, -1], value_range=(0, arch["vocab"]), sequence_axis=1,
                       pad_value=0, role="token_ids")],
            [OutputSpec("logits", "float32", [-1, -1, arch["num_classes"]], sequence_axis=1)])


# ---------------------------------------------------------------------------------------------
# The registry: one ZooEntry per model. A new zoo model is one builder, one I/O function and one
# register() call here (plus its docs); the CLI, the builder, plans and the manifest read ZOO.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooEntry:
    """Everything the project knows about one zoo model, in one place."""

    name: str
    family: str  # the manifest's model family: cnn | bert | lstm | ...
    build_module: Callable[[dict[str, Any]], torch.nn.Module]
    io: Callable[[dict[str, Any]], tuple[list[InputSpec], list[OutputSpec]]]
    # Architecture hyper-parameters per size (every size of SIZES). Sequence models carry
    # ``default_seq_len`` (the default length) and ``max_positions`` (the longest they accept).
    architectures: dict[str, dict[str, Any]]

    def __post_init__(self) -> None:
        missing = [size for size in SIZES if size not in self.architectures]
        if missing:
            raise BadParameterError(f"zoo model {self.name!r} lacks the sizes {missing}")

    def has_sequence(self, size: str) -> bool:
        return "default_seq_len" in self.architectures[size]


ZOO: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    """Add ``entry`` to the zoo (names are unique)."""
    if entry.name in ZOO:
        raise BadParameterError(f"zoo model {entry.name!r} is registered twice")
    ZOO[entry.name] = entry
    return entry


def _seq(max_positions: int, default_seq_len: int = 128) -> dict[str, int]:
    """A sequence model's architecture keys: the longest length it accepts and its default length."""
    return {"max_positions": max_positions, "default_seq_len": default_seq_len}


register(ZooEntry("resnet50", "cnn", resnet_module, resnet_io, {
    # torchvision resnet50: blocks [3, 4, 6, 3], width 64, 224x224, 1000 classes (25.6 M params).
    "full": {"blocks": [3, 4, 6, 3], "width": 64, "resolution": 224, "num_classes": 1000},
    # about 10x fewer FLOPs: fewer blocks, half the width, 160x160 images.
    "small": {"blocks": [2, 3, 4, 2], "width": 32, "resolution": 160, "num_classes": 1000},
    "tiny": {"blocks": [1, 1, 1, 1], "width": 8, "resolution": 32, "num_classes": 10},
}))


register(ZooEntry("bert_base", "bert", bert_module, bert_io, {
    # bert-base-uncased: 12 layers x 768, 12 heads, FFN 3072, vocab 30522, 512 positions.
    "full": {"layers": 12, "hidden": 768, "heads": 12, "intermediate": 3072, "vocab": 30522, **_seq(512)},
    "small": {"layers": 4, "hidden": 256, "heads": 4, "intermediate": 1024, "vocab": 30522, **_seq(512)},
    "tiny": {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64, "vocab": 1000, **_seq(64, 16)},
}))
register(ZooEntry("lstm", "lstm", lstm_module, lstm_io, {
    # A per-step tagger: embedding, 2-layer LSTM with hidden 1024, a linear head per step.
    "full": {"vocab": 10000, "embedding": 512, "hidden": 1024, "layers": 2, "num_classes": 32,
             **_seq(1024)},
    "small": {"vocab": 10000, "embedding": 256, "hidden": 256, "layers": 2, "num_classes": 32,
              **_seq(1024)},
    "tiny": {"vocab": 100, "embedding": 16, "hidden": 16, "layers": 2, "num_classes": 4, **_seq(64, 16)},
}))

MODEL_NAMES = tuple(ZOO)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_weights(module: torch.nn.Module, path: Path, model: str) -> None:
    """Load a local state dict into ``module``; a mismatch is a BadParameterError naming the keys."""
    import torch

    if not path.is_file():
        raise BadParameterError(f"--weights {path}: no such file; pass a state dict saved with torch.save")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickle/zip errors of all kinds: not a state dict
        raise BadParameterError(
            f"--weights {path}: cannot be read as a torch state dict ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); save one with "
            f"torch.save(model.state_dict(), FILE)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BadParameterError(f"--weights {path}: holds a {type(state).__name__}, not a state dict")
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state)
                         if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong_shape:
        def first(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys: {first(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {first(unexpected)}")
        if wrong_shape:
            k = wrong_shape[0]
            problems.append(f"{len(wrong_shape)} keys with other shapes, e.g. {k} "
                            f"{list(state[k].shape)} != {list(expected[k].shape)}")
        raise BadParameterError(
            f"--weights {path} does not match {model}: {'; '.join(problems)}; "
            f"check the model name and --size")
    module.load_state_dict(state, strict=True)


def build_zoo_model(name: str, size: str = "small", *, weights: str | Path | None = None, seed: int = 0,
                    max_seq_len: int | None = None) -> ZooModel:
    """Build zoo model ``name`` in ``size`` with seeded weights (or the state dict in ``weights``).

    ``max_seq_len`` bounds the dynamic sequence axis of sequence models (default 128 for
    ``small``/``full``, 16 for ``tiny``; at most the model's position table, 512 for BERT).
    """
    import torch

    if name not in ZOO:
        raise BadParameterError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)} "
                                f"(or pass --onnx FILE for your own model)")
    if size not in SIZES:
        raise BadParameterError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    entry = ZOO[name]
    arch = dict(entry.architectures[size])
    sequence = None
    if "default_seq_len" in arch:
        limit = arch["max_positions"]
        length = arch["default_seq_len"] if max_seq_len is None else max_seq_len
        if not 1 <= length <= limit:
            raise BadParameterError(f"max sequence length {length} is outside [1, {limit}] for "
                                    f"{name} size {size}")
        sequence = SequenceInfo(max_length=length, default_length=min(arch["default_seq_len"], length))
    elif max_seq_len is not None:
        raise BadParameterError(f"{name} has no sequence axis; drop the maximum sequence length")

    torch.manual_seed(seed)
    module = entry.build_module(arch)
    weights_path = Path(weights) if weights is not None else None
    weights_sha256 = None
    if weights_path is not None:
        load_weights(module, weights_path, name)
        weights_sha256 = file_sha256(weights_path)
    module.eval()
    inputs, outputs = entry.io(arch)
    return ZooModel(name=name, family=entry.family, size=size, module=module, input_specs=inputs,
                    outputs=outputs, sequence=sequence, architecture=arch, seed=seed,
                    weights_path=weights_path, weights_sha256=weights_sha256)
