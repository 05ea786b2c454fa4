"""The Python API where a user looks first: the names of ``from l2c_export import ...``, a light package import, and
every Python example of the README run as written."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

import l2c_export

from .conftest import REPO


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


def _readme_python_examples() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.S | re.M)


NEEDS_A_SERVER = "tritonclient"  # the client example talks to `make serve`'s server


def test_the_readme_has_python_examples_for_the_api():
    examples = _readme_python_examples()
    assert any("from l2c_export import" in example and "L2CPipeline" in example for example in examples)
    assert sum(NEEDS_A_SERVER not in example for example in examples) >= 3


@pytest.mark.parametrize("position", range(len(_readme_python_examples())))
def test_the_readmes_python_examples_run_as_written(default_build, tmp_path, position):
    """Each ```python block of the README, verbatim, in a fresh interpreter, in a folder holding the embedded
    default's build where `l2c-export build` puts it (engines/dit-digits-onnxruntime-fp32)."""
    example = _readme_python_examples()[position]
    if NEEDS_A_SERVER in example:
        pytest.skip("the Triton client example needs a running server (make serve); tests/test_triton.py makes the "
                    "same client calls against a real tritonserver")
    shutil.copytree(default_build, tmp_path / "engines" / "dit-digits-onnxruntime-fp32")
    result = _python(example, tmp_path)
    assert result.returncode == 0, f"README example {position} failed:\n{example}\n{result.stderr}"
