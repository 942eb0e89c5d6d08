"""Multiple targets: two embedded Triton servers given as one address list share one run's load."""

from __future__ import annotations

import pytest
import tritonclient.grpc as grpcclient

from loadtest.driver import LoadSpec, run_load
from loadtest.server_stats import snapshot_statistics
from loadtest.tiny_models import build_repository
from loadtest.workloads import ArrivalSpec
from core.server import EmbeddedTriton

pytestmark = pytest.mark.server


def _successes(url: str) -> int:
    with grpcclient.InferenceServerClient(url) as client:
        return snapshot_statistics(client, ["ident"])["ident"]["success_count"]


def test_two_servers_given_as_one_list_share_the_load_within_ten_percent(tmp_path):
    repository = tmp_path / "repo"
    manifest = build_repository(repository)
    with EmbeddedTriton(repository, models=["ident"]) as first, EmbeddedTriton(repository, models=["ident"]) as second:
        before = [_successes(first.grpc_url), _successes(second.grpc_url)]
        spec = LoadSpec("ident", "whole", ArrivalSpec("poisson", rate_rps=200), None, duration_s=1.5, seed=5)
        result = run_load(f"{first.grpc_url},{second.grpc_url}", manifest, spec)
        counts = [_successes(first.grpc_url) - before[0], _successes(second.grpc_url) - before[1]]
    assert len(result.records) == result.scheduled_arrivals > 200
    assert all(r.ok for r in result.records), result.warnings
    assert sum(counts) == len(result.records)  # every request reached exactly one server
    assert abs(counts[0] - counts[1]) <= 0.1 * max(counts), counts
