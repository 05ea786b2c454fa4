"""Serving throughput through a real Triton server: images per second with N concurrent clients, each on its own
gRPC connection sending single-image requests one after another, and how the dynamic batcher merged them (the
model's ``l2c_sampled_images_total`` over ``l2c_sampling_batches_total``: images per sampling batch)."""

from __future__ import annotations

import threading
import time
import urllib.request
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Throughput:
    clients: int
    images: int
    seconds: float
    images_per_second: float
    latency_ms_median: float
    images_per_sampling_batch: float


def _counter(metrics_url: str, name: str, model: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def measure(server, model: str, clients: int, requests_per_client: int) -> Throughput:
    """``clients`` threads, each with its own gRPC client, start together and send ``requests_per_client``
    single-image requests (label and seed vary) back to back; raises if any request fails."""
    import tritonclient.grpc as grpcclient

    connections = [grpcclient.InferenceServerClient(server.grpc_url) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[BaseException] = []

    def run(c: int) -> None:
        client = connections[c]
        barrier.wait()
        try:
            for r in range(requests_per_client):
                inputs = []
                for name, value in (("labels", (c + r) % 10), ("seed", c * requests_per_client + r)):
                    tensor = grpcclient.InferInput(name, [1, 1], "INT64")
                    tensor.set_data_from_numpy(np.array([[value]], dtype=np.int64))
                    inputs.append(tensor)
                start = time.perf_counter()
                client.infer(model, inputs)
                latencies[c].append(time.perf_counter() - start)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            failures.append(error)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    images_before = _counter(server.metrics_url, "l2c_sampled_images_total", model)
    batches_before = _counter(server.metrics_url, "l2c_sampling_batches_total", model)
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    for client in connections:
        client.close()
    if failures:
        raise RuntimeError(f"a request failed during the throughput measurement: {failures[0]}")
    images = clients * requests_per_client
    merged = ((_counter(server.metrics_url, "l2c_sampled_images_total", model) - images_before)
              / max(1.0, _counter(server.metrics_url, "l2c_sampling_batches_total", model) - batches_before))
    return Throughput(clients, images, seconds, images / seconds,
                      1000 * float(np.median([t for per in latencies for t in per])), merged)


def in_process(pipeline, images: int) -> Throughput:
    """The same single-image requests as one client sends, as direct ``L2CPipeline`` calls: no server at all."""
    latencies = []
    start = time.perf_counter()
    for i in range(images):
        begin = time.perf_counter()
        pipeline([i % 10], seed=i)
        latencies.append(time.perf_counter() - begin)
    seconds = time.perf_counter() - start
    return Throughput(0, images, seconds, images / seconds, 1000 * float(np.median(latencies)), 1.0)


def compare(server, model: str, clients: int = 8, requests_per_client: int = 24, rounds: int = 3,
            pipeline=None) -> dict:
    """1 client against ``clients`` clients (and, given ``pipeline``, direct calls in this process), interleaved
    over ``rounds``; medians of images/s and the ratio."""
    measure(server, model, 1, 4)  # warm-up: the instance's first requests pay for lazy allocations
    single, many, direct = [], [], []
    for _ in range(rounds):
        single.append(measure(server, model, 1, requests_per_client))
        many.append(measure(server, model, clients, requests_per_client))
        if pipeline is not None:
            direct.append(in_process(pipeline, requests_per_client))

    def median(runs: list[Throughput]) -> Throughput:
        return sorted(runs, key=lambda t: t.images_per_second)[len(runs) // 2]

    one, n = median(single), median(many)
    result = {"model": model, "rounds": rounds, "requests_per_client": requests_per_client,
              "one_client": asdict(one), "concurrent": asdict(n),
              "speedup": n.images_per_second / one.images_per_second}
    if direct:
        result["in_process"] = asdict(median(direct))
    return result


def plot(result: dict, path) -> None:
    """Bar chart: images per second with one client and with N concurrent clients (and in-process, if measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.images import figure_to_png

    runs = [("1 client", result["one_client"]), (f"{result['concurrent']['clients']} concurrent clients",
                                                 result["concurrent"])]
    if "in_process" in result:
        runs.insert(0, ("in-process\n(no server)", result["in_process"]))
    figure, axis = plt.subplots(figsize=(2 + 1.6 * len(runs), 3.6))
    values = [run["images_per_second"] for _, run in runs]
    bars = axis.bar([label for label, _ in runs], values, color=["#c6c6c6", "#8da0cb", "#1f77b4"][-len(runs):])
    for bar, (_, run) in zip(bars, runs):
        axis.annotate(f"{run['images_per_second']:.1f} img/s\n{run['images_per_sampling_batch']:.1f} img/batch\n"
                      f"p50 {run['latency_ms_median']:.0f} ms", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=8)
    axis.set_ylabel("images / s")
    axis.set_ylim(0, max(values) * 1.35)
    axis.set_title(f"Triton, dynamic batching: {result['speedup']:.2f}x with {result['concurrent']['clients']} "
                   f"clients", fontsize=10)
    figure.tight_layout()
    figure_to_png(figure, path, tight=False)
