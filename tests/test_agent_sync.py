"""What the agent takes from the coordinator's sync: an assignment it cannot read leaves that
deployment as it is (a newer coordinator's added field is ignored; a value past the agent's rules
is logged), and timing or keys that break their rules are not taken. A real agent, not running
its loop: the sync is applied as the loop would apply it."""

from __future__ import annotations

import logging
import shutil

import pytest

from mlfleet.agent.config import AgentConfig
from mlfleet.agent.runtime import Phase
from mlfleet.agent.server import Agent

pytestmark = pytest.mark.timeout(60)

GOOD = dict(deployment_id="d1", model_id="m1", sha256="a" * 64, model_bytes=10, task="pass_through",
            threads_per_allocation=1, target_allocations=1, queue_capacity=10, cache_size_bytes=0,
            priority="normal", routing_version=3)


@pytest.fixture
def agent(tmp_path):
    ag = Agent(AgentConfig(coordinator="tcp://127.0.0.1:9", node_id="n1", data_dir=str(tmp_path / "a")))
    ag._apply_sync({"assignments": [GOOD], "heartbeat_interval_s": 0.5, "node_timeout_s": 5.0})
    assert ag.runtimes["d1"].phase not in (Phase.STOPPING, Phase.STOPPED)
    yield ag
    ag.close()
    shutil.rmtree(ag.run_dir, ignore_errors=True)


def test_a_field_this_agent_does_not_know_is_ignored(agent):
    agent._apply_sync({"assignments": [dict(GOOD, field_from_a_newer_coordinator=1, routing_version=4)]})
    assert agent.runtimes["d1"].phase not in (Phase.STOPPING, Phase.STOPPED)
    assert agent.routing_versions["d1"] == 4  # and the rest of the assignment is taken


def test_an_assignment_the_agent_cannot_read_leaves_its_deployment_running(agent, caplog):
    with caplog.at_level(logging.ERROR):
        agent._apply_sync({"assignments": [dict(GOOD, max_batch_size=10**9)]})
    assert agent.runtimes["d1"].phase not in (Phase.STOPPING, Phase.STOPPED)
    assert "cannot read (deployment [d1])" in caplog.text
    agent._apply_sync({"assignments": []})  # and one that is really gone is drained
    assert agent.runtimes["d1"].phase in (Phase.STOPPING, Phase.STOPPED)


@pytest.mark.parametrize("hb,nt", [(float("nan"), 5.0), ("1s", 5.0), (0, 5.0), (-1, 5.0),
                                   (1.0, 0.5), (1.0, float("inf")), (True, 5.0)])
def test_timing_that_breaks_its_rules_is_not_taken(agent, hb, nt, caplog):
    with caplog.at_level(logging.ERROR):
        agent._apply_sync({"assignments": [GOOD], "heartbeat_interval_s": hb, "node_timeout_s": nt})
    assert (agent.heartbeat_interval_s, agent.node_timeout_s) == (0.5, 5.0)
    assert "[heartbeat_interval_s]" in caplog.text
    assert agent.runtimes["d1"].phase not in (Phase.STOPPING, Phase.STOPPED)  # the rest applies


def test_client_keys_must_map_keys_to_roles(agent):
    agent._apply_sync({"assignments": [GOOD], "client_keys": {"k1": "infer"}})
    assert agent.client_keys == {"k1": "infer"}
    agent._apply_sync({"assignments": [GOOD], "client_keys": {"k2": "root"}})
    assert agent.client_keys == {"k1": "infer"}
