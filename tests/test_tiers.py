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
    """A test using the Triton server (triton_env through the server fixture) is ``triton``, not ``fast``; one using
    only a build of the same module is ``fast``; every C++ test (cpp_build) is ``cpp``; a ``slow`` one is not fast."""
    files = ("tests/test_triton.py", "tests/test_cpp.py", "tests/test_mmdit.py")
    fast, triton = _collected("fast", *files), _collected("triton", *files)
    assert "test_repository_holds_config_model_and_the_checked_build" in fast
    assert "test_single_requests_over_http_equal_the_pipeline" in triton - fast
    assert not {name for name in fast if name.startswith("test_l2c_run")}
    assert "test_l2c_run_writes_a_png_grid" in _collected("cpp", *files)
    assert "test_eval_on_a_tiny_sd3_the_learned_router_beats_fora_at_a_mac_fraction_of_0_7" not in fast
    assert "test_unpacking_flux_latents_equals_flux_pipelines" in fast


@pytest.mark.parametrize("value, threads", [("1", 1), ("3,1", 3), ("", 0), ("x", 0), ("0", 0)])
def test_onnx_runtimes_default_pool_follows_omp_num_threads(monkeypatch, value, threads):
    """Unless a caller asks for a size, the global pool takes OMP_NUM_THREADS (its first level), else one thread
    per core (0)."""
    from l2c_export.runtime.backends.onnxruntime import _default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert _default_threads() == threads
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert _default_threads() == 0
