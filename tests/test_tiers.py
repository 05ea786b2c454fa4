"""The suite's tiers (tests/conftest.py): a test's tier follows from the fixtures it uses, and pytest-xdist workers
size ONNX Runtime's default thread pool through OMP_NUM_THREADS."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO


def _collected(marker: str, *files: str) -> set[str]:
    """The test names ``pytest --collect-only -m marker`` selects in ``files`` (a real pytest subprocess)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m",
                             marker, *files], capture_output=True, text=True, cwd=REPO)
    assert result.returncode in (0, 5), result.stdout + result.stderr  # 5: nothing selected
    return {line.split("::")[1].split("[")[0] for line in result.stdout.splitlines() if "::" in line}


def test_the_tier_of_a_test_follows_from_the_fixtures_it_uses():
    """``-m "triton or cpp"`` selects a test using the Triton server (triton_env through the server fixture) and
    every C++ test (cpp_build), not a test of the same module using only a build, nor a slow one without either."""
    selected = _collected("triton or cpp", "tests/test_triton.py", "tests/test_cpp.py")
    assert "test_single_requests_over_http_equal_the_pipeline" in selected
    assert "test_l2c_run_writes_the_png_grid_python_writes" in selected
    assert "test_repository_holds_config_model_and_the_checked_build" not in selected
    assert "test_ddpm_images_merged_from_several_requests_equal_each_alone" not in selected


def test_a_test_without_triton_cpp_or_slow_is_fast(request):
    """The default tier is explicit: this test (no such fixture, no slow marker) carries ``fast``."""
    assert request.node.get_closest_marker("fast") is not None
    assert not any(request.node.get_closest_marker(tier) for tier in ("triton", "cpp", "slow"))


@pytest.mark.parametrize("value, threads", [("1", 1), ("3,1", 3), ("", 0), ("x", 0), ("0", 0)])
def test_onnx_runtimes_default_pool_follows_omp_num_threads(monkeypatch, value, threads):
    """Unless a caller asks for a size, the global pool takes OMP_NUM_THREADS (its first level), else one thread
    per core (0)."""
    from l2c_export.runtime.backends.onnxruntime import _default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert _default_threads() == threads
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert _default_threads() == 0
