"""The Python API where a user looks first: the names of ``from l2c_export import ...``, a light package import, and
its Python examples (docs/run-and-python-api.md, run as written by tests/test_docs.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import l2c_export

from .conftest import REPO
from .test_docs import fenced_blocks


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


def test_importing_the_package_and_its_runtime_names_imports_no_torch(tmp_path):
    code = ("import sys\n"
            "import l2c_export\n"
            "assert 'torch' not in sys.modules, 'import l2c_export imported torch'\n"
            "from l2c_export import L2CPipeline, SampleResult, load_manifest\n"
            "assert 'torch' not in sys.modules, 'the run-time names imported torch'\n"
            "print(L2CPipeline.__module__, load_manifest.__module__)\n")
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["l2c_export.runtime.pipeline", "l2c_export.core.manifest"]


def test_every_exported_name_is_its_modules_own_object():
    from l2c_export.builder.build import BuildRequest, build
    from l2c_export.core.manifest import load
    from l2c_export.runtime.pipeline import L2CPipeline
    from l2c_export.tools.verify import verify_build

    assert (l2c_export.L2CPipeline, l2c_export.build, l2c_export.BuildRequest, l2c_export.load_manifest,
            l2c_export.verify_build) == (L2CPipeline, build, BuildRequest, load, verify_build)
    for name in l2c_export.__all__:
        assert getattr(l2c_export, name) is not None, name
    assert set(l2c_export.__all__) <= set(dir(l2c_export))
    with pytest.raises(AttributeError, match="no attribute 'L2CPipe'"):
        l2c_export.L2CPipe  # noqa: B018


def test_the_api_page_has_python_examples_that_run():
    """docs/run-and-python-api.md shows the API in Python blocks that tests/test_docs.py runs as written (none of them
    marked as needing something the tests lack)."""
    blocks = [block for block in fenced_blocks(REPO / "docs" / "run-and-python-api.md") if block.language == "python"]
    assert any("from l2c_export import" in block.code and "L2CPipeline" in block.code for block in blocks)
    assert sum(block.needs is None for block in blocks) >= 3
