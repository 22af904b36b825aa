"""Model formats: TorchScript, torch.export programs and AOTInductor packages, told apart by their
contents at upload, said in the model's config, loaded by the model host, with the same answers;
and warm allocations (warm-up passes before a worker reports ready)."""

from __future__ import annotations

import os
import tempfile
import warnings
import zipfile

import numpy as np
import pytest
import torch

from mlfleet.common import formats as cf
from mlfleet.common.errors import ApiError, BadRequest, ServerError
from mlfleet.common.messages import PutModel, decode
from mlfleet.common.protocol import encode_array
from tests.formats_support import N_IN, big, big_in_three_formats
from tests.helpers import Mlp, running_cluster, save_model, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="session")
def three(tmp_path_factory):
    return big_in_three_formats(tmp_path_factory)


# ---- detection (pure: the file's contents, never its name) ---------------------------------------

def test_each_format_is_detected_from_its_contents_whatever_its_name(three):
    for fmt, path in three.items():
        assert cf.detect(path) == fmt, path.name
    assert cf.inspect(three["aoti"]) == ("aoti", "model")


def _zip(path, entries: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


@pytest.mark.parametrize("make, why", [
    (lambda p: p.write_bytes(b"\x80\x02not a zip at all"), "not a zip archive"),
    (lambda p: torch.save({"w": torch.ones(2)}, str(p)), "torch.save archive"),
    (lambda p: _zip(p, {}), "empty zip"),
    (lambda p: _zip(p, {"a/x.txt": b"1", "b/y.txt": b"2"}), "2 top-level folders"),
    (lambda p: _zip(p, {"m/archive_format": b"pt2", "m/data/weights/w": b""}), "neither an exported"),
    (lambda p: _zip(p, {"m/readme.md": b"hi"}), "not a TorchScript module"),
])
def test_files_that_are_no_model_are_refused_with_the_reason(tmp_path, make, why):
    p = tmp_path / "model.pt"
    make(p)
    with pytest.raises(cf.UnknownFormat, match=why):
        cf.detect(p)


def test_a_truncated_model_is_refused(three, tmp_path):
    data = three["export"].read_bytes()
    p = tmp_path / "cut.pt2"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(cf.UnknownFormat):
        cf.detect(p)


def test_stored_config_sets_the_format_and_stores_the_example_input_as_json():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    cfg = cf.stored_config({"example_input": encode_array(x), "note": "kept"}, "torchscript")
    assert cfg["format"] == "torchscript" and cfg["note"] == "kept"
    import json
    again = json.loads(json.dumps(cfg))  # what the coordinator stores and the host reads
    np.testing.assert_array_equal(cf.example_input(again), x)
    assert cf.example_input({"format": "export"}) is None
    with pytest.raises(cf.UnknownFormat,
                       match=r"\[model_config.format\] is \[aoti\] but the model file is \[export\]"):
        cf.stored_config({"format": "aoti"}, "export")
    with pytest.raises(cf.UnknownFormat, match=r"\[model_config.example_input\] is not a valid array"):
        cf.stored_config({"example_input": {"dtype": "float32", "shape": [5], "data": b"\0" * 8}}, "export")
    with pytest.raises(cf.UnknownFormat, match=r"\[model_config.other\] must not hold bytes"):
        cf.stored_config({"other": [b"x"]}, "export")


def test_put_model_checks_format_and_example_input_at_the_edge():
    base = {"model_id": "m", "upload_id": "0" * 32, "sha256": "0" * 64}
    with pytest.raises(BadRequest, match=r"invalid \[model_config.format\] \[onnx\]"):
        decode(PutModel, {**base, "model_config": {"format": "onnx"}})
    with pytest.raises(BadRequest, match=r"\[model_config.example_input.data\] is required"):
        decode(PutModel, {**base, "model_config": {"example_input": {"dtype": "float32", "shape": [1]}}})
    big = encode_array(np.zeros(20000, np.float32))
    with pytest.raises(BadRequest, match=r"\[model_config.example_input.data\] must be at most 65536 bytes"):
        decode(PutModel, {**base, "model_config": {"example_input": big}})
    small = encode_array(np.zeros((1, 8), np.float32))
    ok = decode(PutModel, {**base, "model_config": {"example_input": small}})
    assert ok.model_config["example_input"]["shape"] == [1, 8]


# ---- deployed: the same answers in every format --------------------------------------------------

def test_the_same_model_in_three_formats_gives_the_same_answers(three, tmp_path):
    x = np.random.default_rng(1).standard_normal((3, N_IN)).astype(np.float32)
    one = x[:1]
    with torch.no_grad():
        want = big()(torch.from_numpy(x)).numpy()
    with running_cluster(tmp_path, {"node-a": 3}) as c, c.client() as client:
        got = {}
        for fmt, path in three.items():
            put = client.put_model(f"big-{fmt}", path)
            assert put["model_size_bytes"] == path.stat().st_size
            conf = client.get_models(f"big-{fmt}")["trained_model_configs"][0]
            assert conf["inference_config"]["pass_through"]["format"] == fmt
            client.start_deployment(f"big-{fmt}", wait_for="fully_allocated", timeout="90s")
            res = client.infer(f"big-{fmt}", [{"input": x}, {"input": one}])["inference_results"]
            got[fmt] = [r["predicted_value"] for r in res]
            with pytest.raises(ApiError) as e:  # a wrong shape is the caller's 400, in every format
                client.infer(f"big-{fmt}", [{"input": np.zeros((2, N_IN + 1), np.float32)}])
            assert e.value.status == 400, (fmt, e.value)
        for fmt, (batch, single) in got.items():
            np.testing.assert_allclose(batch, want, rtol=1e-5, atol=1e-6, err_msg=fmt)
            np.testing.assert_allclose(single, want[:1], rtol=1e-5, atol=1e-6, err_msg=fmt)
        log = (tmp_path / "node-a.log").read_text()
        assert "warm-up: 1 documents" in log  # the exported program's stored example input
        # the exported program's and the package's hosts loaded in scratch directories of their
        # own; the agent removes them once those hosts have ended (a sandboxed host cannot)
        hosts = c.worker_pids("node-a")
        scratch = [d for d in os.listdir(tempfile.gettempdir())
                   if any(d.startswith(f"mlfleet-host-{pid}-") for pid in hosts)]
        assert len(scratch) == 2, (hosts, scratch)
        for fmt in three:
            client.stop_deployment(f"big-{fmt}")
        wait_until(lambda: not c.worker_pids("node-a"), 60, what="the model hosts to end")
        wait_until(lambda: not any(os.path.exists(os.path.join(tempfile.gettempdir(), d)) for d in scratch),
                   30, what="their scratch directories removed")


def test_upload_refuses_a_file_that_is_no_model_and_a_wrong_format_claim(three, tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save(big().state_dict(), str(weights))
    with running_cluster(tmp_path, {}) as c, c.client() as client:
        with pytest.raises(ApiError) as e:
            client.put_model("weights", weights)
        assert e.value.status == 400 and "torch.save archive" in e.value.reason, e.value
        with pytest.raises(ApiError) as e:
            client.put_model("claims", three["export"], model_config={"format": "torchscript"})
        assert e.value.status == 400
        assert "[model_config.format] is [torchscript] but the model file is [export]" in e.value.reason
        assert client.get_models()["count"] == 0


# ---- warm allocations ----------------------------------------------------------------------------

def test_exported_programs_and_packages_load_without_torchscript(three, tmp_path, monkeypatch):
    """The model host's paths for the new formats use no deprecated torch.jit API: with every
    warning shown (pytest's config silences torch.jit's deprecation for TorchScript's own
    paths), loading and running them raises none."""
    import tempfile

    from mlfleet.agent import formats
    for var in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR", "AOTI_RUNTIME_CHECK_INPUTS"):
        monkeypatch.setenv(var, os.environ.get(var, ""))  # load() sets them, as in the host
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    x = torch.ones(1, N_IN)
    for fmt in ("export", "aoti"):
        scratch = tmp_path / fmt
        scratch.mkdir()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            loaded = formats.load(str(three[fmt]), {"format": fmt}, str(scratch))
            with torch.inference_mode():
                loaded.model(x)
        assert loaded.format == fmt and not list(scratch.iterdir())  # emptied once loaded
        jit = [w for w in seen if "torch.jit" in str(w.message)]
        assert not jit, [str(w.message) for w in jit]


def _small_torchscript(path):
    with warnings.catch_warnings():  # TorchScript itself is deprecated: building one is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        return save_model(Mlp(), path)


def test_torchscript_warms_up_with_the_example_input_given_at_upload(tmp_path):
    ts = _small_torchscript(tmp_path / "m.pt")
    ex = np.ones((1, 8), np.float32)
    with running_cluster(tmp_path, {"node-a": 2}) as c, c.client() as client:
        client.put_model("warm", ts, model_config={"example_input": encode_array(ex)})
        stored = client.get_models("warm")["trained_model_configs"][0]["inference_config"]["pass_through"]
        assert stored["format"] == "torchscript" and stored["example_input"]["shape"] == [1, 8]
        client.start_deployment("warm", number_of_allocations=2, wait_for="fully_allocated")
        res = client.infer("warm", [{"input": ex}])["inference_results"][0]["predicted_value"]
        with torch.no_grad():
            want = torch.jit.load(str(ts))(torch.from_numpy(ex)).numpy()
        np.testing.assert_allclose(res, want, rtol=1e-5, atol=1e-6)
    log = (tmp_path / "node-a.log").read_text()
    assert log.count("warm-up: 1 documents x 3 passes") == 2, log[-3000:]  # each worker, before ready


def test_a_failing_warm_up_fails_the_start_with_the_reason(tmp_path):
    ts = _small_torchscript(tmp_path / "m.pt")
    wrong = encode_array(np.ones((1, 11), np.float32))  # the model takes 8 features
    with running_cluster(tmp_path, {"node-a": 2}) as c, c.client() as client:
        client.put_model("cold", ts, model_config={"example_input": wrong})
        with pytest.raises(ServerError) as e:
            client.start_deployment("cold", wait_for="started", timeout="60s")
        assert e.value.status == 500
        assert "warm-up failed" in e.value.reason, e.value
        assert "the model rejected the input" in e.value.reason, e.value


def test_an_aoti_package_for_cpu_features_this_cpu_lacks_is_refused(tmp_path):
    """AOTI_CPU_ISA (the package's metadata) against /proc/cpuinfo's flags: a library built for
    AVX-512 would die of SIGILL on a CPU without it; unknown tokens are not held against it."""
    from mlfleet.agent.formats import missing_cpu_features
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\n")
    assert missing_cpu_features("AVX2", str(cpuinfo)) == []
    assert missing_cpu_features("AVX512 AVX512_VNNI", str(cpuinfo)) == ["AVX512", "AVX512_VNNI"]
    assert missing_cpu_features("SOMETHING_NEW", str(cpuinfo)) == []
    assert missing_cpu_features("AVX512", str(tmp_path / "absent")) == []  # cannot tell: load it


def test_stored_example_inputs_past_the_cap_are_not_used_for_warm_up(tmp_path):
    """A tensor expanded with stride 0 claims a 4 GiB shape in a few bytes of file; warming up
    with it would materialise that in the model host and in every worker."""
    from mlfleet.agent import formats

    class Sum(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(dim=0, keepdim=True)

    path = str(tmp_path / "absurd.pt2")
    torch.export.save(torch.export.export(Sum(), (torch.zeros(1).expand(1 << 15, 1 << 15),)), path)
    assert os.path.getsize(path) < 1 << 20
    small = str(tmp_path / "small.pt2")
    torch.export.save(torch.export.export(Sum(), (torch.ones(4, 8),)), small)
    scratch = formats.make_scratch_dir()
    try:
        assert formats.load(path, {}, scratch).examples == []
        assert len(formats.load(small, {}, scratch).examples) == 1  # within the cap: used
    finally:
        formats.remove_scratch_dirs(os.getpid())
