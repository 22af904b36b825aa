"""Updating allocations under load, rebalancing, and adaptive allocations with real daemons."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import numpy as np
import psutil
import pytest
import torch

from mlfleet.common.errors import ApiError, BadRequest, Conflict, NotFound, TooManyRequests
from tests.helpers import Mlp, Slow, Stream, alloc_status, running_cluster, save_model, wait_until

pytestmark = pytest.mark.timeout(240)


def placement(client, dep: str) -> dict[str, int]:
    ds = client.get_stats(dep)["trained_model_stats"][0]["deployment_stats"]
    return {next(iter(n["node"])): n["number_of_allocations"] for n in ds["nodes"]
            if n["number_of_allocations"] > 0}


def test_update_rules(cluster2, mlp_path):
    with cluster2.client() as client:
        client.put_model("upd", mlp_path)
        with pytest.raises(NotFound, match=r"No known model deployment with id \[nope\]"):
            client.update_deployment("nope", number_of_allocations=2)
        client.start_deployment("upd", wait_for="fully_allocated")
        try:
            same = client.update_deployment("upd", number_of_allocations=1)
            assert same["assignment"]["task_parameters"]["number_of_allocations"] == 1
            with pytest.raises(TooManyRequests,
                               match="Could not update deployment because there are not enough"):
                client.update_deployment("upd", number_of_allocations=9)
            assert alloc_status(client, "upd")["target_allocation_count"] == 1  # nothing changed
            with pytest.raises(BadRequest, match="must be a positive integer"):
                client.update_deployment("upd", number_of_allocations=0)
            body = client.update_deployment("upd", number_of_allocations=3)
            a = body["assignment"]
            assert a["task_parameters"]["number_of_allocations"] == 3
            assert sum(r["target_allocations"] for r in a["routing_table"].values()) == 3
            wait_until(lambda: alloc_status(client, "upd") == {
                "allocation_count": 3, "target_allocation_count": 3, "state": "fully_allocated"}, 30,
                what="3 allocations")
            with pytest.raises(BadRequest, match="cannot be set if adaptive allocations is enabled"):
                client.update_deployment("upd", number_of_allocations=2,
                                         adaptive_allocations={"enabled": True})
            client.update_deployment("upd", number_of_allocations=1)
            wait_until(lambda: alloc_status(client, "upd")["allocation_count"] == 1, 30, what="back to 1")
        finally:
            client.stop_deployment("upd")
        client.start_deployment("upd", deployment_id="upd-starting", wait_for="starting")
        try:
            stats = client.get_stats("upd-starting")["trained_model_stats"][0]["deployment_stats"]
            if stats["state"] == "starting":
                with pytest.raises(Conflict, match=r"not in \[started\] state"):
                    client.update_deployment("upd-starting", number_of_allocations=2)
        finally:
            client.stop_deployment("upd-starting")


def test_no_request_lost_while_allocations_change_and_move(tmp_path):
    """A continuous, bounded stream of requests while the deployment goes 1 -> 4 -> 1 allocations
    and moves from node-a to node-b: every request succeeds."""
    with running_cluster(tmp_path, {"node-a": 2, "node-b": 2}) as c:
        with c.client() as client:
            client.put_model("mlp", save_model(Mlp(), tmp_path / "mlp.pt"))
            client.start_deployment("mlp", wait_for="fully_allocated", cache_size="0b")
            assert placement(client, "mlp") == {"node-a": 1}
            s = Stream(client, "mlp", threads=4)
            s.more(100, 20)
            client.update_deployment("mlp", number_of_allocations=4)
            wait_until(lambda: placement(client, "mlp") == {"node-a": 2, "node-b": 2}, 30, what="2+2")
            s.more(200, 20)
            client.update_deployment("mlp", number_of_allocations=1)
            wait_until(lambda: placement(client, "mlp") == {"node-b": 1}, 30, what="moved to node-b")
            wait_until(lambda: c.worker_pids("node-a") == [], 30, what="node-a drained and stopped")
            s.more(200, 20)
            errors = s.finish()
            outcomes = s.outcomes
            assert not errors, f"{len(errors)} of {len(outcomes)} requests failed: {errors[:3]}"
            assert len(outcomes) > 500


ADAPTIVE = ["--adaptive-interval", "300ms", "--scale-to-zero-after", "2s", "--scale-up-cooldown", "1s",
            "--warm-zero-keep", "60s"]


def test_adaptive_scale_to_zero_then_from_zero_on_a_warm_host(tmp_path):
    with running_cluster(tmp_path, {"node-a": 2}, coordinator_extra=ADAPTIVE) as c:
        with c.client() as client:
            client.put_model("mlp", save_model(Mlp(), tmp_path / "mlp.pt"))
            body = client.start_deployment("mlp", wait_for="started", adaptive_allocations={
                "enabled": True, "min_number_of_allocations": 0, "max_number_of_allocations": 2})
            a = body["assignment"]
            assert a["task_parameters"]["number_of_allocations"] == 1
            assert a["adaptive_allocations"] == {"enabled": True, "min_number_of_allocations": 0,
                                                 "max_number_of_allocations": 2}
            x = np.ones((1, 8), np.float32)
            expected = client.infer("mlp", [{"input": x}])["inference_results"][0]["predicted_value"]
            host = [p for p in psutil.Process(c.agents["node-a"].pid).children()]
            assert len(host) == 1
            # idle: scaled to zero; the model host stays (warm), its worker goes
            wait_until(lambda: alloc_status(client, "mlp") == {
                "allocation_count": 0, "target_allocation_count": 0, "state": "fully_allocated"}, 30,
                what="scale to zero")
            wait_until(lambda: len(c.worker_pids("node-a")) == 1, 10, what="only the warm host left")
            assert host[0].is_running()
            ds = client.get_stats("mlp")["trained_model_stats"][0]["deployment_stats"]
            assert ds["state"] == "started" and ds["number_of_allocations"] == 0
            # the warm host still answers what its cache holds
            cached = client.infer("mlp", [{"input": x}])["inference_results"][0]["predicted_value"]
            np.testing.assert_array_equal(cached, expected)
            assert alloc_status(client, "mlp")["target_allocation_count"] == 0
            # a request it must compute starts one allocation on the warm host and is served
            y = np.full((1, 8), 2.0, np.float32)
            reply = client.infer("mlp", [{"input": y}], timeout="10s")
            out = reply["inference_results"][0]["predicted_value"]
            ref = torch.jit.load(str(tmp_path / "mlp.pt"))(torch.from_numpy(y)).detach().numpy()
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
            assert alloc_status(client, "mlp")["target_allocation_count"] == 1
            assert [p.pid for p in psutil.Process(c.agents["node-a"].pid).children()] == [host[0].pid], \
                "scaling from zero reloaded the model instead of using the warm host"
            with pytest.raises(BadRequest, match="cannot be set if adaptive allocations is enabled"):
                client.update_deployment("mlp", number_of_allocations=2)
            client.stop_deployment("mlp")


def test_adaptive_scales_up_under_load_and_back_down(tmp_path):
    with running_cluster(tmp_path, {"node-a": 2}, coordinator_extra=ADAPTIVE) as c:
        with c.client() as client:
            client.put_model("slow", save_model(Slow(), tmp_path / "slow.pt"))
            client.start_deployment("slow", cache_size="0b", wait_for="started", adaptive_allocations={
                "enabled": True, "min_number_of_allocations": 1, "max_number_of_allocations": 2})
            stop = threading.Event()
            failures: list[object] = []

            def load(i: int) -> None:
                k = 0
                while not stop.is_set():
                    try:
                        x = np.array([0.1 + i / 1000 + k / 1e6], np.float32)
                        client.infer("slow", [{"input": x}], "20s")
                    except ApiError as e:
                        failures.append(e)
                    k += 1

            with cf.ThreadPoolExecutor(4) as pool:
                futs = [pool.submit(load, i) for i in range(4)]
                try:
                    wait_until(lambda: alloc_status(client, "slow")["allocation_count"] == 2, 60,
                               what="scale up to 2 under load")
                finally:
                    stop.set()
                    for f in futs:
                        f.result(60)
            assert not failures, failures[:3]
            wait_until(lambda: alloc_status(client, "slow")["target_allocation_count"] == 1, 60,
                       what="scale back down to min 1 when idle")
            client.stop_deployment("slow")


def test_at_most_100_requests_wait_for_an_allocation(tmp_path):
    """At zero allocations (no warm host: a cold start takes seconds), the first request starts one
    allocation; 100 wait for it and are answered with the routing table, the 101st gets 429."""
    import zmq

    from mlfleet.common.protocol import decode_reply, encode_request
    cold = ["--adaptive-interval", "200ms", "--scale-to-zero-after", "1s", "--scale-up-cooldown", "0s",
            "--warm-zero-keep", "0s"]
    with running_cluster(tmp_path, {"node-a": 2}, coordinator_extra=cold) as c:
        with c.client() as client:
            client.put_model("mlp", save_model(Mlp(), tmp_path / "mlp.pt"))
            client.start_deployment("mlp", wait_for="started", adaptive_allocations={
                "enabled": True, "min_number_of_allocations": 0, "max_number_of_allocations": 1})
            wait_until(lambda: alloc_status(client, "mlp")["target_allocation_count"] == 0, 30, what="zero")
            wait_until(lambda: c.worker_pids("node-a") == [], 30, what="the model host gone")
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(c.coordinator.endpoint)
        try:
            for rid in range(1, 102):
                s.send(encode_request("await_routes", rid, {"deployment_id": "mlp", "timeout_ms": 60000}))
            replies = {}
            while len(replies) < 101:
                assert s.poll(60000), f"only {len(replies)} answers"
                rep = decode_reply(s.recv())
                replies[rep.id] = rep
        finally:
            s.close(0)
        statuses = sorted(r.status for r in replies.values())
        assert statuses == [200] * 100 + [429], statuses
        rejected = next(r for r in replies.values() if r.status == 429)
        assert "Too many pending requests" in rejected.body["error"]["reason"]
        ok = next(r for r in replies.values() if r.status == 200)
        assert ok.body["routes"][0]["current_allocations"] == 1
