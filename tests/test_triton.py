"""Serving on a real Triton Inference Server: the repository ``l2c-export triton`` writes, served by the
``tritonserver`` that nvidia-pytriton bundles (from ``.venv-triton``, which ``make test`` creates), queried over HTTP
and gRPC with tritonclient and compared with ``L2CPipeline`` on the same noise."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from l2c_export.core.images import to_uint8
from l2c_export.runtime.pipeline import L2CPipeline
from l2c_export.serving.sampling import decode_request, sample_requests
from l2c_export.serving.triton import ServingError, TritonServer, free_port, server_environment, write_repository

from .conftest import REPO, run_cli

MODEL = "l2c"
TAMPERED = "l2c_tampered"
PAIR = "l2c_pair"  # two instances, two images per Triton batch


def _server_env() -> Path:
    return Path(os.environ.get("L2C_TRITON_ENV") or REPO / ".venv-triton")


@pytest.fixture(scope="session")
def triton_env() -> Path:
    try:
        server_environment(_server_env())
    except ServingError as error:
        pytest.skip(f"no Triton server environment ({error}); `make triton-env` makes it")
    return _server_env()


@pytest.fixture(scope="session")
def digits_build(default_build) -> Path:
    """The embedded default's build, as `l2c-export build` makes it (tests/conftest.py's, built once per run)."""
    return default_build


@pytest.fixture(scope="session")
def pipeline(digits_build) -> L2CPipeline:
    return L2CPipeline.from_engine_dir(digits_build)


@pytest.fixture(scope="session")
def repository(digits_build, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("triton") / "repo"
    run_cli("triton", str(digits_build), "--repo", str(repo), "--max-queue-delay-us", "20000")
    write_repository(digits_build, repo, name=PAIR, instances=2, max_batch_size=2)
    write_repository(digits_build, repo, name=TAMPERED)
    weights = repo / TAMPERED / "1" / "build" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    return repo


def running_server(repository: Path, triton_env: Path, tmp_path_factory):
    """A tritonserver on free local ports serving ``repository``, for a fixture to yield; stopped after, with its
    whole process group checked gone."""
    log = tmp_path_factory.mktemp("log") / "tritonserver.log"
    server = TritonServer(repository, triton_env, http_port=free_port(), grpc_port=free_port(),
                          metrics_port=free_port(), log=log)
    server.start()
    group = server.process.pid
    yield server
    server.stop()
    _assert_group_gone(group)


@pytest.fixture(scope="session")
def server(repository, triton_env, tmp_path_factory):
    yield from running_server(repository, triton_env, tmp_path_factory)


def _assert_group_gone(group: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)  # the server and its backend stubs are all gone


def _close_to(served: np.ndarray, reference: np.ndarray) -> None:
    span = float(reference.max() - reference.min())
    assert served.shape == reference.shape
    assert np.abs(served - reference).max() <= 1e-5 * span


def _http_inputs(labels, noise=None, seed=None, cfg_scale=None) -> list:
    inputs = []
    for name, value, dtype in (("labels", labels, "INT64"), ("noise", noise, "FP32"), ("seed", seed, "INT64"),
                               ("cfg_scale", cfg_scale, "FP32")):
        if value is not None:
            value = np.asarray(value, dtype=np.float32 if dtype == "FP32" else np.int64)
            tensor = httpclient.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
    return inputs


def _grpc_inputs(labels, seed) -> list:
    inputs = []
    for name, value in (("labels", labels), ("seed", seed)):
        tensor = grpcclient.InferInput(name, list(np.shape(value)), "INT64")
        tensor.set_data_from_numpy(np.asarray(value, dtype=np.int64))
        inputs.append(tensor)
    return inputs


# ------------------------------------------------------------------------------------------------------------------
def test_repository_holds_config_model_and_the_checked_build(repository, digits_build):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    model = repository / MODEL
    config = text_format.Parse((model / "config.pbtxt").read_text(), pb.ModelConfig())
    assert config.backend == "python" and config.max_batch_size == 8  # the build's model batch 16, guided
    assert [(i.name, list(i.dims), i.optional) for i in config.input] == [
        ("labels", [1], False), ("noise", [1, 8, 8], True), ("seed", [1], True), ("cfg_scale", [1], True)]
    assert [(o.name, list(o.dims)) for o in config.output] == [("samples", [1, 8, 8]), ("images", [8, 8, 3])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 20000
    assert config.parameters["backend"].string_value == "onnxruntime"
    assert json.loads(config.parameters["input_ranges"].string_value) == {  # what decode_request enforces
        "labels": [0, 9], "noise": [-1000.0, 1000.0], "seed": [0, 2 ** 63 - 1], "cfg_scale": [1.0, 100.0]}
    assert (model / "1" / "model.py").read_text().startswith('"""The Triton Python model of an l2c-export build')
    for file in digits_build.iterdir():
        assert (model / "1" / "build" / file.name).read_bytes() == file.read_bytes()
    pair = text_format.Parse((repository / PAIR / "config.pbtxt").read_text(), pb.ModelConfig())
    assert pair.instance_group[0].count == 2 and pair.max_batch_size == 2
    assert not list(repository.parent.glob(".*staging"))


def test_repository_write_refuses_a_bad_build_and_keeps_the_model_it_had(digits_build, tmp_path):
    repo = tmp_path / "repo"
    write_repository(digits_build, repo)
    before = (repo / MODEL / "config.pbtxt").read_text()
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in digits_build.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "full.onnx").write_bytes(b"not the graph")
    result = run_cli("triton", str(broken), "--repo", str(repo), "--max-batch-size", "3", check=False)
    assert result.returncode != 0
    assert "full.onnx" in result.stderr and "sha256" in result.stderr and "Traceback" not in result.stderr
    assert (repo / MODEL / "config.pbtxt").read_text() == before
    assert sorted(p.name for p in repo.iterdir()) == [MODEL] and not list(tmp_path.glob(".*staging"))
    missing = run_cli("triton", str(tmp_path / "nothing"), "--repo", str(repo), check=False)
    assert missing.returncode == 2 and "manifest.json" in missing.stderr
    (repo / "mine").mkdir()
    (repo / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a model written by l2c-export triton"):
        write_repository(digits_build, repo, name="mine")
    assert (repo / "mine" / "notes.txt").read_text() == "keep me"
    write_repository(digits_build, repo, max_batch_size=3)  # a model of its own is replaced
    assert "max_batch_size: 3" in (repo / MODEL / "config.pbtxt").read_text()


def test_repository_write_refuses_a_default_guidance_scale_the_model_would_refuse(digits_build, tmp_path):
    build = tmp_path / "build"
    shutil.copytree(digits_build, build)
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["guidance"]["cfg_scale"] = 150.0
    (build / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("triton", str(build), "--repo", str(tmp_path / "repo"), check=False)
    assert result.returncode == 2 and not (tmp_path / "repo").exists()
    assert result.stderr.strip().splitlines() == [
        f"Error: {build / 'manifest.json'}: guidance.cfg_scale (the served default) is 150.0; expected a number in "
        f"[1.0, 100.0]"]


def test_single_requests_over_http_equal_the_pipeline(server, pipeline):
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        result = client.infer(MODEL, _http_inputs([[3], [7]], seed=[[11], [12]]))
        samples = result.as_numpy("samples")
        for i, (label, seed) in enumerate([(3, 11), (7, 12)]):
            _close_to(samples[i], pipeline([label], seed=seed).samples[0])
        images = result.as_numpy("images")
        assert images.dtype == np.uint8 and images.shape == (2, 8, 8, 3)
        assert np.array_equal(images, np.repeat(to_uint8(samples), 3, axis=-1))

        noise = np.random.default_rng(5).standard_normal((2, 1, 8, 8), dtype=np.float32)
        result = client.infer(MODEL, _http_inputs([[1], [4]], noise=noise))
        _close_to(result.as_numpy("samples"), pipeline([1, 4], noise=noise).samples)
    finally:
        client.close()


def test_grpc_requests_with_their_own_guidance_equal_the_pipeline(server, pipeline):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inputs = _grpc_inputs([[2], [2], [9]], [[4], [4], [6]])
        scale = grpcclient.InferInput("cfg_scale", [3, 1], "FP32")
        scale.set_data_from_numpy(np.array([[1.0], [2.5], [2.5]], dtype=np.float32))
        samples = client.infer(MODEL, inputs + [scale]).as_numpy("samples")
        _close_to(samples[0], pipeline([2], seed=4, cfg_scale=1.0).samples[0])
        _close_to(samples[1], pipeline([2], seed=4, cfg_scale=2.5).samples[0])
        _close_to(samples[2], pipeline([9], seed=6, cfg_scale=2.5).samples[0])
        assert np.abs(samples[0] - samples[1]).max() > 1e-2  # the scale did reach the sampler
    finally:
        client.close()


def _counter(server, name: str, model: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _statistics(server, model: str) -> tuple[int, int]:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        stats = client.get_inference_statistics(model)["model_stats"][0]
    finally:
        client.close()
    return int(stats["inference_count"]), int(stats["execution_count"])


def _concurrent(server, model: str, count: int, protocol: str) -> list:
    """``count`` clients, each its own connection, sending one single-image request at the same moment."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def client_thread(i: int) -> None:
        if protocol == "grpc":
            client = grpcclient.InferenceServerClient(server.grpc_url)
            inputs = _grpc_inputs([[i % 10]], [[100 + i]])
        else:
            client = httpclient.InferenceServerClient(server.http_url)
            inputs = _http_inputs([[i % 10]], seed=[[100 + i]])
        try:
            barrier.wait(timeout=30)
            results[i] = client.infer(model, inputs).as_numpy("samples")[0]
        except Exception as error:  # noqa: BLE001 - checked below
            results[i] = error
        finally:
            client.close()

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_eight_concurrent_clients_are_merged_into_sampling_batches(server, pipeline, protocol):
    requests_before, executions_before = _statistics(server, MODEL)
    batches_before = _counter(server, "l2c_sampling_batches_total", MODEL)
    images_before = _counter(server, "l2c_sampled_images_total", MODEL)
    results = _concurrent(server, MODEL, 8, protocol)
    for i, samples in enumerate(results):
        assert not isinstance(samples, Exception), samples
        _close_to(samples, pipeline([i % 10], seed=100 + i).samples[0])
    requests, executions = _statistics(server, MODEL)
    assert requests - requests_before == 8
    assert executions - executions_before < 8  # Triton's dynamic batcher merged requests ...
    assert _counter(server, "l2c_sampled_images_total", MODEL) - images_before == 8
    assert _counter(server, "l2c_sampling_batches_total", MODEL) - batches_before < 8  # ... into sampling batches


def test_two_instances_with_small_batches_serve_concurrent_clients(server, pipeline):
    results = _concurrent(server, PAIR, 8, "grpc")
    for i, samples in enumerate(results):
        assert not isinstance(samples, Exception), samples
        _close_to(samples, pipeline([i % 10], seed=100 + i).samples[0])
    requests, executions = _statistics(server, PAIR)
    assert requests >= 8 and executions >= 4  # at most 2 images per Triton batch


def _i64(value) -> np.ndarray:
    return np.asarray(value, dtype=np.int64)


def _f32(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def _typed_inputs(module, **arrays) -> list:
    """tritonclient inputs (``module``: tritonclient.http or .grpc) with each array's own dtype and shape, as a
    hostile client would send them."""
    inputs = []
    for name, value in arrays.items():
        tensor = module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


# Every bad request a client can send, and the error it must get: the input named and what was expected. Triton
# itself checks dtypes, shapes and the batch limit against config.pbtxt; the model checks values
# (l2c_export/serving/sampling.py). docs/reliability.md "Hostile clients (Triton)" lists the same cases.
BAD_REQUESTS = {
    "labels as FP32": (dict(labels=_f32([[3]])),
                       r"input 'labels' data-type is 'FP32', but model 'l2c' expects 'INT64'"),
    "noise as FP64": (dict(labels=_i64([[3]]), noise=np.zeros((1, 1, 8, 8))),
                      r"input 'noise' data-type is 'FP64', but model 'l2c' expects 'FP32'"),
    "cfg_scale as INT64": (dict(labels=_i64([[3]]), cfg_scale=_i64([[2]])),
                           r"input 'cfg_scale' data-type is 'INT64', but model 'l2c' expects 'FP32'"),
    "labels of shape [1, 2]": (dict(labels=_i64([[3, 4]])),
                               r"unexpected shape for input 'labels' for model 'l2c'\. Expected \[-1,1\], got \[1,2\]"),
    "noise of shape [1, 1, 4, 4]": (dict(labels=_i64([[1]]), noise=_f32(np.zeros((1, 1, 4, 4)))),
                                    r"unexpected shape for input 'noise' .*Expected \[-1,1,8,8\], got \[1,1,4,4\]"),
    "one seed for two labels": (dict(labels=_i64([[1], [2]]), seed=_i64([[1]])),
                                r"input 'labels' batch size does not match other inputs"),
    "a batch of 9, above max_batch_size 8": (dict(labels=_i64(np.zeros((9, 1)))),
                                             r"inference request batch-size must be <= 8 for 'l2c'"),
    "no labels": (dict(seed=_i64([[1]])), r"input 'labels' is missing; expected int64 class labels of shape \(n, 1\)"),
    "an input the model does not have": (dict(labels=_i64([[1]]), bogus=_i64([[1]])),
                                         r"unexpected inference input 'bogus' for model 'l2c'"),
    "label 10 of 10 classes": (dict(labels=_i64([[10]])),
                               r"input 'labels': labels \[10\] are out of range; expected class indices in 0\.\.9"),
    "NaN noise": (dict(labels=_i64([[1]]), noise=_f32(np.full((1, 1, 8, 8), np.nan))),
                  r"input 'noise' holds values that are not finite; expected finite values in \[-1000\.0, 1000\.0\]"),
    "infinite noise": (dict(labels=_i64([[1]]), noise=_f32(np.full((1, 1, 8, 8), -np.inf))),
                       r"input 'noise' holds values that are not finite"),
    "noise of 1e30": (dict(labels=_i64([[1]]), noise=_f32(np.full((1, 1, 8, 8), 1e30))),
                      r"input 'noise' holds a value of magnitude 1\.0+\d*e\+30; expected values in "
                      r"\[-1000\.0, 1000\.0\]"),
    "noise and seed together": (dict(labels=_i64([[1]]), noise=_f32(np.zeros((1, 1, 8, 8))), seed=_i64([[3]])),
                                r"inputs 'noise' and 'seed' are both given"),
    "NaN cfg_scale": (dict(labels=_i64([[1]]), cfg_scale=_f32([[np.nan]])),
                      r"input 'cfg_scale' is nan; expected a finite number"),
    "infinite cfg_scale": (dict(labels=_i64([[1]]), cfg_scale=_f32([[np.inf]])),
                           r"input 'cfg_scale' is inf; expected a finite number"),
    "cfg_scale 1e30": (dict(labels=_i64([[1]]), cfg_scale=_f32([[1e30]])),
                       r"input 'cfg_scale' is 1\.0+\d*e\+30; expected a number in \[1\.0, 100\.0\]"),
    "cfg_scale 0.5": (dict(labels=_i64([[1]]), cfg_scale=_f32([[0.5]])),
                      r"input 'cfg_scale' is 0\.5; expected a number in \[1\.0, 100\.0\]"),
    "seed -1": (dict(labels=_i64([[1]]), seed=_i64([[-1]])),
                r"input 'seed' is \[-1\]; expected seeds in 0\.\.9223372036854775807"),
}


def _assert_serves(client, pipeline, label: int = 5, seed: int = 8) -> None:
    """The next good request answers correctly."""
    result = client.infer(MODEL, _http_inputs([[label]], seed=[[seed]]))
    _close_to(result.as_numpy("samples")[0], pipeline([label], seed=seed).samples[0])


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_errors_naming_the_input_and_the_server_keeps_serving(server, pipeline, case):
    inputs, message = BAD_REQUESTS[case]
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=60)
    try:
        with pytest.raises(InferenceServerException, match=message):
            client.infer(MODEL, _typed_inputs(httpclient, **inputs))
        _assert_serves(client, pipeline)
    finally:
        client.close()


def test_inputs_at_the_edges_of_their_ranges_are_served_as_the_pipeline_samples_them(server, pipeline):
    """The largest seed int64 holds (2^63 - 1), the smallest and largest guidance scales and noise at +-1000:
    each answered as L2CPipeline answers it."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        edges = [(2 ** 63 - 1, 1.0), (0, 100.0)]
        inputs = _typed_inputs(grpcclient, labels=_i64([[4], [4]]), seed=_i64([[s] for s, _ in edges]),
                               cfg_scale=_f32([[c] for _, c in edges]))
        samples = client.infer(MODEL, inputs, client_timeout=60).as_numpy("samples")
        for sample, (seed, scale) in zip(samples, edges):
            _close_to(sample, pipeline([4], seed=seed, cfg_scale=scale).samples[0])
        noise = _f32(np.where(np.arange(64).reshape(1, 1, 8, 8) % 2, 1000.0, -1000.0))
        inputs = _typed_inputs(grpcclient, labels=_i64([[2]]), noise=noise)
        _close_to(client.infer(MODEL, inputs, client_timeout=60).as_numpy("samples"),
                  pipeline([2], noise=noise).samples)
    finally:
        client.close()


def test_a_bad_request_merged_with_good_ones_fails_alone(server, pipeline):
    client = httpclient.InferenceServerClient(server.http_url, concurrency=4)
    try:
        pending = [client.async_infer(MODEL, _http_inputs([[label]], seed=[[seed]]))
                   for label, seed in ((1, 21), (12, 22), (3, 23))]
        good = [pending[0].get_result().as_numpy("samples")[0], pending[2].get_result().as_numpy("samples")[0]]
        with pytest.raises(InferenceServerException, match="out of range"):
            pending[1].get_result()
    finally:
        client.close()
    _close_to(good[0], pipeline([1], seed=21).samples[0])
    _close_to(good[1], pipeline([3], seed=23).samples[0])


def test_a_build_that_fails_its_sha256_is_not_served_and_says_why(server, pipeline):
    state, reason = server.model_states()[TAMPERED]
    assert state == "UNAVAILABLE" and "weights.bin" in reason and "sha256" in reason
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        with pytest.raises(InferenceServerException, match=TAMPERED):
            client.infer(TAMPERED, _http_inputs([[1]], seed=[[1]]))
        assert client.is_model_ready(MODEL)
    finally:
        client.close()


def test_metrics_report_tritons_request_counts_and_latencies(server):
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert f'nv_inference_request_success{{model="{MODEL}",version="1"}}' in text
    assert "nv_inference_request_duration_us" in text and "l2c_sampled_images_total" in text


# ------------------------------------------------------------------------------------------------------------------
def test_serve_prints_where_it_listens_and_stops_with_its_stubs_on_sigterm(repository, triton_env, pipeline):
    ports = [free_port() for _ in range(3)]
    process = subprocess.Popen([sys.executable, "-m", "l2c_export.cli", "serve", str(repository),
                                "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
                                "--metrics-port", str(ports[2]), "--env", str(triton_env)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(300, lambda: os.killpg(process.pid, signal.SIGKILL))  # never hang the suite
    watchdog.start()
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("ready:"):
                break
        assert lines and lines[-1].startswith("ready:"), "".join(lines)
        assert f"HTTP 127.0.0.1:{ports[0]}" in lines[-1] and f"gRPC 127.0.0.1:{ports[1]}" in lines[-1]
        assert f"model {MODEL}: READY\n" in lines and any(line.startswith(f"model {TAMPERED}: UNAVAILABLE")
                                                          for line in lines)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}")
        result = client.infer(MODEL, _http_inputs([[6]], seed=[[2]]))
        client.close()
        _close_to(result.as_numpy("samples")[0], pipeline([6], seed=2).samples[0])
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        watchdog.cancel()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # serve's own group held only itself; the server had its own session, which must be gone too
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_serve_refuses_a_port_in_use_and_port_zero(repository, triton_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", str(repository), "--http-port", str(port), "--grpc-port", str(free_port()),
                         "--metrics-port", str(free_port()), "--env", str(triton_env), check=False)
    assert result.returncode == 2 and f"--http-port {port}: the port is in use" in result.stderr
    zero = run_cli("serve", str(repository), "--grpc-port", "0", "--env", str(triton_env), check=False)
    assert zero.returncode != 0 and "--grpc-port" in zero.stderr


def test_serve_without_a_server_environment_says_how_to_make_one(repository, tmp_path):
    result = run_cli("serve", str(repository), "--env", str(tmp_path / "nowhere"), check=False)
    assert result.returncode == 3 and "make triton-env" in result.stderr


# ------------------------------------------------------------------------------------------------------------------
def test_ddpm_images_merged_from_several_requests_equal_each_alone(tmp_path):
    """DDPM draws step noise per sampling batch, so its images are sampled one per batch: merged requests still
    give every image exactly what it gives alone."""
    build = tmp_path / "ddpm"
    run_cli("build", "--sampler", "ddpm", "--out", str(build))
    pipe = L2CPipeline.from_engine_dir(build)
    requests = [decode_request(pipe, np.array([[2], [5]]), seed=np.array([[1], [2]])),
                decode_request(pipe, np.array([[5]]), seed=np.array([[3]]))]
    results, batch_sizes = sample_requests(pipe, requests)
    assert batch_sizes == [1, 1, 1]
    for samples, labels, seeds in zip(results, ([2, 5], [5]), ([1, 2], [3])):
        for sample, label, seed in zip(samples, labels, seeds):
            _close_to(sample, pipe([label], seed=seed).samples[0])


def test_a_tensorrt_manifest_gets_the_same_interface_on_gpu_instances(digits_build):
    from l2c_export.core.manifest import load
    from l2c_export.serving.triton import model_config

    manifest = load(digits_build)
    onnx, trt = model_config(manifest, MODEL), model_config({**manifest, "backend": "tensorrt"}, MODEL)
    assert list(trt.input) == list(onnx.input) and list(trt.output) == list(onnx.output)
    assert trt.max_batch_size == onnx.max_batch_size and trt.dynamic_batching == onnx.dynamic_batching
    assert trt.instance_group[0].kind == trt.instance_group[0].KIND_GPU
    assert onnx.instance_group[0].kind == onnx.instance_group[0].KIND_CPU
    assert trt.parameters["backend"].string_value == "tensorrt"


def test_tensorrt_build_repository_has_the_same_shape(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (its PyPI packages fetch their libraries "
                                           "from NVIDIA's own index), so no TensorRT build can be made")
    build = tmp_path / "trt"
    run_cli("build", "--backend", "tensorrt", "--out", str(build))
    repo = tmp_path / "repo"
    run_cli("triton", str(build), "--repo", str(repo))
    config = (repo / MODEL / "config.pbtxt").read_text()
    assert 'string_value: "tensorrt"' in config and "KIND_GPU" in config
    assert (repo / MODEL / "1" / "model.py").is_file() and (repo / MODEL / "1" / "build" / "manifest.json").is_file()


def test_the_docs_client_snippet_works_against_the_server(server):
    """The client block of docs/serving-triton.md (marked as needing a server, so tests/test_docs.py skips it)."""
    text = (REPO / "docs" / "serving-triton.md").read_text()
    snippet = text[text.index("## A client"):].split("```python\n", 1)[1].split("```", 1)[0]
    assert '"127.0.0.1:8000"' in snippet  # what `make serve` listens on
    result = subprocess.run([sys.executable, "-c", snippet.replace("127.0.0.1:8000", server.http_url)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(4, 1, 8, 8) (4, 8, 8, 3)"


def test_serving_throughput_counts_every_image_and_how_they_were_merged(server, pipeline, tmp_path):
    from l2c_export.serving import throughput

    result = throughput.compare(server, MODEL, clients=4, requests_per_client=2, rounds=1, pipeline=pipeline)
    assert result["one_client"]["images"] == 2 and result["concurrent"]["images"] == 8
    assert result["in_process"]["images"] == 2
    assert result["one_client"]["images_per_sampling_batch"] == 1.0  # one client never has a request to merge with
    assert 1.0 <= result["concurrent"]["images_per_sampling_batch"] <= 4.0
    throughput.plot(result, tmp_path / "serving.png")
    assert (tmp_path / "serving.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------------------------
# Hostile clients: huge requests, many clients, clients that vanish, a server that stops, memory and files over
# many requests. Every client has a bounded timeout, so a hang fails the test instead of stalling the suite.

MIB = 1024 * 1024


def _group_rss_kib(group: int) -> int:
    """Resident memory of every process in the server's process group (tritonserver and its backend stubs), KiB."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
            if int(fields[2]) != group:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(match.group(1)) if match else 0
    return total


def _post_binary(server, header: dict, payload: bytes) -> tuple[int, str]:
    """One HTTP inference request in Triton's binary tensor format, sent by hand: (status, body)."""
    body = json.dumps(header).encode()
    connection = http.client.HTTPConnection(*server.http_url.split(":"), timeout=60)
    try:
        connection.request("POST", f"/v2/models/{MODEL}/infer", body=body + payload,
                           headers={"Inference-Header-Content-Length": str(len(body)),
                                    "Content-Type": "application/octet-stream"})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_requests_of_64_mb_are_refused_naming_the_input_and_not_kept(server, pipeline):
    size = 64 * MIB
    group = server.process.pid
    before = _group_rss_kib(group)
    for _ in range(2):  # HTTP: 64 MB of data behind a labels tensor that declares one image (8 bytes)
        status, body = _post_binary(server, {"inputs": [{"name": "labels", "shape": [1, 1], "datatype": "INT64",
                                                         "parameters": {"binary_data_size": size}}]}, bytes(size))
        assert status == 400 and "input 'labels'" in body and "Expected 8, got 67108864" in body, body
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inputs = _typed_inputs(grpcclient, labels=_i64([[1]]), noise=np.zeros((1, 1, 4096, 4096), np.float32))
        for _ in range(8):  # gRPC: a 64 MB noise tensor, 4096 x 4096 where the model takes 8 x 8
            with pytest.raises(InferenceServerException,
                               match=r"unexpected shape for input 'noise' .*Expected \[-1,1,8,8\]"):
                client.infer(MODEL, inputs, client_timeout=60)
    finally:
        client.close()
    grown_mib = (_group_rss_kib(group) - before) / 1024
    # Not kept: with Triton's default gRPC object pool of 8 (not --grpc-infer-allocation-pool-size=0), +370-400 MiB
    assert grown_mib < 4 * 64, f"the server grew by {grown_mib:.0f} MiB over ten 64 MB requests"
    assert server.process.poll() is None
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=60)
    try:
        _assert_serves(client, pipeline)
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_64_concurrent_clients_each_get_their_own_image(server, pipeline, protocol):
    results = _concurrent(server, MODEL, 64, protocol)
    for i, samples in enumerate(results):
        assert samples is not None, f"client {i} did not finish"
        assert not isinstance(samples, Exception), samples
        _close_to(samples, pipeline([i % 10], seed=100 + i).samples[0])


def _wait_for_inferences(server, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while _statistics(server, MODEL)[0] < count:
        assert time.monotonic() < deadline, f"the server did not run {count} inferences in {timeout:.0f} s"
        time.sleep(0.05)


def test_clients_that_disconnect_mid_request_leave_the_server_serving(server, pipeline):
    host, port = server.http_url.split(":")
    header = json.dumps({"inputs": [{"name": "labels", "shape": [8, 1], "datatype": "INT64", "data": list(range(8))},
                                    {"name": "seed", "shape": [8, 1], "datatype": "INT64", "data": list(range(8))}]})
    request = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {server.http_url}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(header)}\r\n\r\n").encode()
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=60)
    try:
        # 1. gone halfway through sending its request
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(request + header.encode()[:40])
        _assert_serves(client, pipeline)
        # 2. gone right after sending it: the server samples 8 images for nobody, and serves the next client
        done_before = _statistics(server, MODEL)[0]
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(request + header.encode())
        _wait_for_inferences(server, done_before + 8)
        _assert_serves(client, pipeline, label=6, seed=9)
        # 3. a gRPC client whose deadline passes while its request is being sampled
        grpc_client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            with pytest.raises(InferenceServerException, match="Deadline Exceeded"):
                grpc_client.infer(MODEL, _typed_inputs(grpcclient, labels=_i64(np.zeros((8, 1))),
                                                       seed=_i64(np.arange(8).reshape(8, 1))), client_timeout=0.01)
        finally:
            grpc_client.close()
        _assert_serves(client, pipeline, label=7, seed=10)
    finally:
        client.close()
    assert server.process.poll() is None


def _mixed_request(i: int):
    """Request ``i`` of a repeating mix of 10: 4 good (guided and not, seed or noise), 6 bad of different kinds.
    Returns (inputs as arrays, the (label, seed, cfg_scale) a good one must equal, or the error a bad one gets)."""
    label, seed = i % 10, i % 3
    good = {0: (1.0, None), 3: (2.5, None), 6: (1.0, "noise"), 8: (1.0, None)}
    if i % 10 in good:
        scale, source = good[i % 10]
        arrays = dict(labels=_i64([[label]]), cfg_scale=_f32([[scale]]))
        if source == "noise":
            arrays["noise"] = np.random.default_rng(seed).standard_normal((1, 1, 8, 8), dtype=np.float32)
        else:
            arrays["seed"] = _i64([[seed]])
        return arrays, (label, seed, scale, source)
    case = list(BAD_REQUESTS)[(i * 7) % len(BAD_REQUESTS)]
    return BAD_REQUESTS[case]


def _send_mixed(server, indices: range, clients: int = 8) -> tuple[list, list]:
    """Sends the mixed requests ``indices`` from ``clients`` concurrent HTTP clients. Returns the failures found (a
    good request answered with an error, a bad one answered or with another error, a hung client) and the good
    requests' answers, as ((label, seed, cfg_scale, source), samples), for :func:`_check_answers`."""
    answers: list = []
    failures: list = []
    lock = threading.Lock()
    pending = list(indices)

    def client_thread() -> None:
        client = httpclient.InferenceServerClient(server.http_url, connection_timeout=30, network_timeout=60)
        try:
            while True:
                with lock:
                    if not pending:
                        return
                    i = pending.pop()
                arrays, expected = _mixed_request(i)
                try:
                    samples = client.infer(MODEL, _typed_inputs(httpclient, **arrays)).as_numpy("samples")
                except InferenceServerException as error:
                    if isinstance(expected, tuple) or not re.search(expected, str(error)):
                        failures.append((i, str(error)))
                    continue
                if not isinstance(expected, tuple):
                    failures.append((i, "answered; expected an error matching " + expected))
                    continue
                answers.append((expected, samples))
        finally:
            client.close()

    threads = [threading.Thread(target=client_thread) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
        if thread.is_alive():
            failures.append(("a client", "did not finish in 300 s"))
    return failures, answers


def _check_answers(pipeline, answers: list) -> None:
    """Every good mixed request's samples equal L2CPipeline's (each distinct request sampled in process once)."""
    references: dict = {}
    for key, samples in answers:
        if key not in references:
            label, seed, scale, source = key
            noise = (np.random.default_rng(seed).standard_normal((1, 1, 8, 8), dtype=np.float32)
                     if source == "noise" else None)
            references[key] = pipeline([label], seed=seed, noise=noise, cfg_scale=scale).samples
        _close_to(samples, references[key])


def test_memory_after_1000_mixed_requests_stays_within_10_percent_of_after_the_first_100(server, pipeline):
    group = server.process.pid
    failures, answers = _send_mixed(server, range(100))
    after_100 = _group_rss_kib(group)
    more_failures, more_answers = _send_mixed(server, range(100, 1000))
    after_1000 = _group_rss_kib(group)
    assert not failures + more_failures, (failures + more_failures)[:5]
    assert len(answers + more_answers) == 400  # 4 good in every 10
    _check_answers(pipeline, answers + more_answers)
    assert after_1000 <= 1.10 * after_100, f"server RSS {after_100} KiB after 100 requests, {after_1000} after 1000"


def test_a_request_arriving_while_the_server_stops_gets_an_answer_or_an_error_never_a_hang(
        digits_build, triton_env, pipeline, tmp_path):
    """``l2c-export serve`` gets SIGTERM while four clients (two HTTP, two gRPC) keep sending: every request ends
    within its client's timeout, with a correct image or an error ("Server is stopping", a closed connection, a
    refused one); `serve` exits 0."""
    repo = tmp_path / "repo"
    write_repository(digits_build, repo)
    ports = [free_port() for _ in range(3)]
    scratch_before = _server_scratch()
    process = subprocess.Popen([sys.executable, "-m", "l2c_export.cli", "serve", str(repo), "--http-port",
                                str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
                                "--env", str(triton_env)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    watchdog = threading.Timer(300, lambda: os.killpg(process.pid, signal.SIGKILL))  # never hang the suite
    watchdog.start()
    outcomes: list = []  # (client, sent at, samples or the exception)
    stop_sending = threading.Event()

    def client_loop(k: int) -> None:
        http = k % 2 == 0
        client = (httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}", connection_timeout=10, network_timeout=30)
                  if http else grpcclient.InferenceServerClient(f"127.0.0.1:{ports[1]}"))
        try:
            while not stop_sending.is_set():
                sent = time.monotonic()
                try:
                    if http:
                        result = client.infer(MODEL, _http_inputs([[k]], seed=[[k]]))
                    else:
                        result = client.infer(MODEL, _grpc_inputs([[k]], [[k]]), client_timeout=30)
                    outcomes.append((k, sent, result.as_numpy("samples")[0]))
                except Exception as error:  # noqa: BLE001 - every way a request can end is an outcome
                    outcomes.append((k, sent, error))
                time.sleep(0.01)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(4)]
    try:
        for line in process.stdout:
            if line.startswith("ready:"):
                break
        assert process.poll() is None, "serve ended before it was ready"
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        stopped = time.monotonic()
        time.sleep(0.5)  # requests sent after the server is gone, too
    finally:
        stop_sending.set()
        for thread in threads:
            thread.join(timeout=90)
        watchdog.cancel()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    references = {k: pipeline([k], seed=k).samples[0] for k in range(4)}
    answered = [(k, sent) for k, sent, outcome in outcomes if not isinstance(outcome, Exception)]
    for k, _, outcome in outcomes:
        if not isinstance(outcome, Exception):
            _close_to(outcome, references[k])
    assert any(sent < stopping for _, sent in answered)  # served before the signal, ...
    assert any(stopping <= sent < stopped for _, sent, _ in outcomes)  # ... requests sent while it stopped ...
    assert any(sent >= stopped for _, sent, _ in outcomes)  # ... and after it was gone, all ended (none hung)
    # Its exit timed out (Triton waits for the clients' open HTTP connections, then exits at once): what a clean exit
    # removes (the Python backend's /tmp/python_env_*, the stubs' shared memory) is removed all the same
    assert _server_scratch() <= scratch_before


def _server_scratch() -> set[Path]:
    return {*Path("/tmp").glob("python_env_??????"), *Path("/dev/shm").glob("l2c-triton-*")}


def _traced_server_class(trace: Path):
    """A TritonServer run under strace, which logs every system call of the server and its stubs that could write
    a file (strace keeps tracing through SIGTERM: it blocks fatal signals when it runs a program into a log)."""
    calls = ("open,openat,openat2,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,rmdir,link,linkat,"
             "symlink,symlinkat,truncate,ftruncate,mknod,mknodat,chmod,fchmodat,utimensat")

    class TracedServer(TritonServer):
        def command(self) -> list[str]:
            return ["strace", "-f", "-qq", "--seccomp-bpf", "-y", "-e", f"trace={calls}", "-o", str(trace),
                    *super().command()]

    return TracedServer


_WRITING = re.compile(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND")


def _written_paths(trace: Path, cwd: Path) -> set[str]:
    """Every path the traced processes opened for writing, created, removed, renamed, truncated or changed the
    mode or times of, tried or done, resolved against the directory strace names beside each descriptor (else
    ``cwd``, the server's working directory)."""
    paths = set()
    for line in trace.read_text(errors="replace").splitlines():
        match = re.match(r"\d+\s+(\w+)\((.*)", line)
        if not match:
            continue  # "<... resumed>" and signal lines: the call was logged when it started
        call, args = match.groups()
        if call.startswith("open") and not _WRITING.search(args):
            continue
        directory = re.match(r"(?:AT_FDCWD|\d+)<([^>]*)>", args)
        if call == "ftruncate":
            paths.add(directory.group(1))
            continue
        for path in re.findall(r'"((?:[^"\\]|\\.)*)"', args):
            paths.add(os.path.normpath(os.path.join(directory.group(1) if directory else str(cwd), path)))
    return paths


def test_the_server_writes_nothing_outside_the_model_repository(digits_build, triton_env, pipeline, tmp_path):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: this test reads the server's file-writing system calls from it")
    probe = subprocess.run(["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=openat", "-o", os.devnull, "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here ({probe.stderr.strip()[-200:]})")
    repo = tmp_path / "repo"
    write_repository(digits_build, repo)
    build_files = {path: path.read_bytes() for path in digits_build.iterdir()}
    trace = tmp_path / "strace.log"
    server = _traced_server_class(trace)(repo, triton_env, http_port=free_port(), grpc_port=free_port(),
                                         metrics_port=free_port())
    server.start()
    try:
        scratch, shm_prefix = server._work, server._shm_prefix
        failures, answers = _send_mixed(server, range(60), clients=4)
        assert not failures, failures[:5]
        _check_answers(pipeline, answers)
    finally:
        server.stop()
    allowed = (str(repo) + "/", str(scratch) + "/", f"/dev/shm/{shm_prefix}")
    written = _written_paths(trace, scratch)
    assert any(path.startswith(f"/dev/shm/{shm_prefix}") for path in written)  # the trace saw the stubs start
    outside = sorted(path for path in written if not path.startswith(allowed) and path not in ("/dev/null", "/dev/tty")
                     # the Python backend makes and removes an empty /tmp/python_env_XXXXXX (its path is fixed)
                     and not re.fullmatch(r"/tmp/python_env_\w{6}", path))
    assert not outside, outside
    leftovers = [path for path in written if not path.startswith(str(repo) + "/") and os.path.lexists(path)
                 and path not in ("/dev/null", "/dev/tty")]
    assert not leftovers, leftovers  # the scratch folder, the shared memory and the python_env folder are gone
    assert {path: path.read_bytes() for path in digits_build.iterdir()} == build_files
