"""Small models for the slicing tests: exported from torch the way the zoo does, cached per process.

Kept apart from the zoo on purpose: the slicer must work for any ONNX file, including user-style
exports (TorchScript, opset 9, initializers listed as inputs, a fixed batch of 1).
"""

from __future__ import annotations

import functools
import io
import warnings

import onnx

from slicing.inputs import InputSpec


def _export(module, args, input_names, output_names, *, dynamic: dict | None, dynamo: bool = True,
            opset: int | None = None, keep_initializers_as_inputs: bool = False) -> onnx.ModelProto:
    import torch

    module.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(module, args, input_names=input_names, output_names=output_names,
                                        dynamic_shapes=dynamic, dynamo=True, external_data=False,
                                        verbose=False)
            return program.model_proto
        torch.onnx.export(module, args, buffer, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic, dynamo=False, opset_version=opset,
                          keep_initializers_as_inputs=keep_initializers_as_inputs)
    return onnx.load_from_string(buffer.getvalue())


def _cnn_module(width: int = 8, blocks: int = 4, num_classes: int = 10):
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, channels_in: int, channels_out: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels_out)
            self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels_out)
            self.skip = (nn.Identity() if stride == 1 and channels_in == channels_out else
                         nn.Conv2d(channels_in, channels_out, 1, stride, bias=False))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))

    class Cnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, width, 3, 1, 1)
            layers, channels = [], width
            for i in range(blocks):
                out = width * (2 ** (i // 2))
                layers.append(Block(channels, out, 2 if i % 2 == 1 else 1))
                channels = out
            self.blocks = nn.Sequential(*layers)
            self.fc = nn.Linear(channels, num_classes)

        def forward(self, images):
            x = self.blocks(torch.relu(self.stem(images)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return Cnn()


@functools.lru_cache(maxsize=None)
def cnn_bytes() -> bytes:
    import torch

    batch = torch.export.Dim("batch", min=1, max=64)
    model = _export(_cnn_module(), (torch.randn(2, 3, 16, 16),), ["images"], ["logits"],
                    dynamic={"images": {0: batch}})
    return model.SerializeToString()


CNN_SPECS = [InputSpec("images", "float32", [-1, 3, 16, 16])]


@functools.lru_cache(maxsize=None)
def bert_bytes() -> bytes:
    import torch

    from slicing.zoo import bert_module

    torch.manual_seed(0)
    module = bert_module({"vocab": 100, "hidden": 16, "layers": 3, "heads": 2, "intermediate": 32,
                          "max_positions": 32})
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("seq", min=1, max=32)
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    model = _export(module, (ids, mask), ["input_ids", "attention_mask"],
                    ["last_hidden_state", "pooler_output"],
                    dynamic={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
    return model.SerializeToString()


BERT_SPECS = [
    InputSpec("input_ids", "int64", [-1, -1], value_range=(0, 100), sequence_axis=1, role="token_ids"),
    InputSpec("attention_mask", "int64", [-1, -1], value_range=(0, 2), sequence_axis=1,
              role="attention_mask"),
]


def _lstm_module():
    import torch

    from slicing.zoo import lstm_module

    torch.manual_seed(0)
    return lstm_module({"vocab": 50, "embedding": 8, "hidden": 12, "layers": 2, "num_classes": 4})


@functools.lru_cache(maxsize=None)
def lstm_bytes() -> bytes:
    import torch

    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("seq", min=1, max=64)
    model = _export(_lstm_module(), (torch.randint(0, 50, (2, 7)),), ["tokens"], ["logits"],
                    dynamic={"tokens": {0: batch, 1: seq}})
    return model.SerializeToString()


LSTM_SPECS = [InputSpec("tokens", "int64", [-1, -1], value_range=(0, 50), sequence_axis=1, role="token_ids")]


def _inception_module():
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Mixed(nn.Module):
        """An Inception-style block: four parallel branches concatenated on channels."""

        def __init__(self, channels: int):
            super().__init__()
            self.b1 = nn.Conv2d(channels, 4, 1)
            self.b3 = nn.Sequential(nn.Conv2d(channels, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
            self.b5 = nn.Sequential(nn.Conv2d(channels, 2, 1), nn.ReLU(), nn.Conv2d(2, 4, 5, padding=2))
            self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(channels, 4, 1))

        def forward(self, x):
            return torch.relu(torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], dim=1))

    class Inception(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.mixed = nn.Sequential(Mixed(8), Mixed(16), Mixed(16))
            self.fc = nn.Linear(16, 5)

        def forward(self, images):
            x = self.mixed(torch.relu(self.stem(images)))
            return self.fc(x.mean(dim=(2, 3)))

    return Inception()


@functools.lru_cache(maxsize=None)
def inception_bytes() -> bytes:
    import torch

    batch = torch.export.Dim("batch", min=1, max=64)
    model = _export(_inception_module(), (torch.randn(2, 3, 12, 12),), ["images"], ["logits"],
                    dynamic={"images": {0: batch}})
    return model.SerializeToString()


INCEPTION_SPECS = [InputSpec("images", "float32", [-1, 3, 12, 12])]


@functools.lru_cache(maxsize=None)
def user_cnn_bytes() -> bytes:
    """A user-style export: TorchScript, opset 9, initializers as inputs, a fixed batch of 1."""
    import torch

    model = _export(_cnn_module(width=4, blocks=2), (torch.randn(1, 3, 16, 16),), ["images"], ["logits"],
                    dynamic=None, dynamo=False, opset=9, keep_initializers_as_inputs=True)
    return model.SerializeToString()


@functools.lru_cache(maxsize=None)
def user_reshaping_bytes() -> bytes:
    """A fixed-batch-1 model that folds its batch into another dim: it must not be made batchable."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Folding(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):  # [1, 4, 3] -> [2, 6] -> [2, 3] -> [1, 6]: rows mix with the batch
            return self.fc(x.reshape(-1, 6)).reshape(1, -1)

    return _export(Folding(), (torch.randn(1, 4, 3),), ["x"], ["y"], dynamic=None, dynamo=False,
                   opset=9, keep_initializers_as_inputs=True).SerializeToString()


def load(name: str) -> onnx.ModelProto:
    builders = {"cnn": cnn_bytes, "bert": bert_bytes, "lstm": lstm_bytes, "inception": inception_bytes,
                "user_cnn": user_cnn_bytes, "user_reshaping": user_reshaping_bytes}
    return onnx.load_from_string(builders[name]())
