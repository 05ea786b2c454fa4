"""``l2c-export triton`` and ``serve``: the logic is in :mod:`l2c_export.serving`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import EXIT_BACKEND_UNAVAILABLE, EXIT_BAD_INPUT, CommandError, main


@main.command()
@click.argument("build_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--repo", required=True, type=click.Path(file_okay=False, path_type=Path), help="Model repository.")
@click.option("--name", default="l2c", show_default=True, help="Model name in the repository.")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Model instances (each its own process with its own engines).")
@click.option("--max-batch-size", type=click.IntRange(1, 4096),
              help="Images per Triton batch (default: the build's model batch limit / 2).")
@click.option("--max-queue-delay-us", type=click.IntRange(0, 10_000_000), default=2000, show_default=True,
              help="How long the dynamic batcher waits for more requests.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Instance kind (default: cuda for TensorRT).")
@click.option("--threads", type=click.IntRange(0, 1024), default=0, show_default=True,
              help="ONNX Runtime intra-op threads per instance (0: one per core).")
def triton(build_dir, repo, name, instances, max_batch_size, max_queue_delay_us, device, threads):
    """Write a Triton model repository serving BUILD_DIR (Python backend running L2CPipeline in-process)."""
    from ..serving.triton import write_repository

    model = write_repository(build_dir, repo, name=name, instances=instances, max_batch_size=max_batch_size,
                             max_queue_delay_us=max_queue_delay_us, device=device, threads=threads)
    click.echo(f"wrote {model} (config.pbtxt, 1/model.py, 1/build); serve it with: l2c-export serve {repo}")


@main.command()
@click.argument("repo", type=click.Path(file_okay=False, path_type=Path))
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--env", type=click.Path(file_okay=False, path_type=Path),
              help="The server's Python environment (default: $L2C_TRITON_ENV, else .venv-triton).")
def serve(repo, http_port, grpc_port, metrics_port, env):
    """Run the bundled tritonserver on REPO on 127.0.0.1 until Ctrl-C or SIGTERM."""
    from ..serving.triton import ServerUnavailable, ServingError, serve_forever

    try:
        sys.exit(serve_forever(repo, env=env, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                               echo=click.echo))
    except ServerUnavailable as error:
        raise CommandError(str(error), EXIT_BACKEND_UNAVAILABLE) from None
    except ServingError as error:
        raise CommandError(str(error), EXIT_BAD_INPUT) from None
