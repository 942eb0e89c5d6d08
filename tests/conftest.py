"""Shared fixtures: the embedded Triton server and small ONNX graphs built in code."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.server import EmbeddedTriton


@pytest.fixture
def triton_server() -> Iterator[Callable[..., EmbeddedTriton]]:
    """Factory: ``triton_server(repository, models=None, **kwargs)`` starts a server, stopped at test end."""
    started: list[EmbeddedTriton] = []

    def start(repository: Path, models: list[str] | None = None, **kwargs) -> EmbeddedTriton:
        server = EmbeddedTriton(repository, models=models, **kwargs)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
