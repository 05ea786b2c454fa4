"""Serving on a real Triton Inference Server: the repository ``l2c-export triton`` writes, served by the
``tritonserver`` that nvidia-pytriton bundles (from ``.venv-triton``, which ``make test`` creates), queried over HTTP
and gRPC with tritonclient and compared with ``L2CPipeline`` on the same noise."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

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
def digits_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build") / "dit-digits"
    run_cli("build", "--out", str(out))
    return out


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


@pytest.fixture(scope="session")
def server(repository, triton_env, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "tritonserver.log"
    server = TritonServer(repository, triton_env, http_port=free_port(), grpc_port=free_port(),
                          metrics_port=free_port(), log=log)
    server.start()
    group = server.process.pid
    yield server
    server.stop()
    _assert_group_gone(group)


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


@pytest.mark.parametrize("inputs, message", [
    (dict(labels=[[10]]), "out of range"),
    (dict(labels=[[1]], noise=np.zeros((1, 1, 4, 4))), "noise"),
    (dict(labels=[[1]], noise=np.full((1, 1, 8, 8), np.nan)), "not finite"),
    (dict(labels=[[1]], noise=np.zeros((1, 1, 8, 8)), seed=[[3]]), "both given"),
    (dict(labels=[[1]], seed=[[-4]]), "'seed'"),
    (dict(labels=[[1]], cfg_scale=[[0.5]]), "'cfg_scale' is 0.5; expected a number at least 1"),
    (dict(labels=[[1]], cfg_scale=[[np.inf]]), "not finite"),
])
def test_bad_requests_get_errors_naming_the_input_and_the_server_keeps_serving(server, pipeline, inputs, message):
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        with pytest.raises(InferenceServerException, match=message):
            client.infer(MODEL, _http_inputs(**inputs))
        result = client.infer(MODEL, _http_inputs([[5]], seed=[[8]]))
        _close_to(result.as_numpy("samples")[0], pipeline([5], seed=8).samples[0])
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


def test_the_readme_client_snippet_works_against_the_server(server):
    text = (REPO / "README.md").read_text()
    snippet = text[text.index("## Serving on Triton"):].split("```python\n", 1)[1].split("```", 1)[0]
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
