from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

from tests.helpers import Cluster, Mlp, running_cluster, save_model

# Generating examples can be slow on a loaded 2-core machine: that is no failure of the code.
settings.register_profile("mlfleet", suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mlfleet")


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(Mlp(), tmp_path_factory.mktemp("models") / "mlp.pt")


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory):
    """A coordinator and two agents with 4 allocated processors each, shared by a test module."""
    with running_cluster(tmp_path_factory.mktemp("cluster"), {"node-a": 4, "node-b": 4}) as c:
        yield c


@pytest.fixture
def fresh_cluster(tmp_path):
    """A cluster of one's own (coordinator only; the test adds agents)."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        leftovers = c.shutdown()
        assert not leftovers, f"processes outlived their daemons: {leftovers}"
