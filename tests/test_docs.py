"""The README and the pages of docs/ as a newcomer walks them: every ```bash and ```python block runs as written, in
document order, in one work folder (the embedded default's build, a tiny diffusers PixArt folder with a T5 text
encoder as $DIR); every ```cpp block compiles; every relative link and anchor leads somewhere. A block that cannot run
here says why on the line before its fence, ``<!-- needs: REASON -->``, REASON one of :data:`NEEDS`."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO, cli_command, python_command

# docs/bench*.md are tables `make bench` and `make bench-large` write (l2c_export/tools/bench_suite.py), and
# docs/eval-curve-*.md those `eval --budgets --markdown` writes (l2c_export/demo/curve.py): not pages.
PAGES = sorted(page for page in (REPO / "docs").glob("*.md") if not page.name.startswith(("bench", "eval-curve")))
DOC_FILES = [REPO / "README.md", *PAGES]
README_MAX_LINES = 200

RUN = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python"}
COMPILED = {"cpp"}
NEVER_RUN = {"text"}  # output, formats and synopses
# What a marked block needs, and why the tests cannot give it. "cpp build" blocks run where the C++ build exists.
NEEDS = {
    "triton server": "a running tritonserver (tests/test_triton.py runs the real one)",
    "gpu": "an NVIDIA GPU",
    "tensorrt": "TensorRT (not installable on these machines)",
    "long run": "minutes to hours of CPU",
    "official checkpoint": "files the user brings: the authors' checkpoints and routers, real-size folders",
    "setup": "a make target that installs environments or compiles the C++ runtime",
    "cpp build": "cpp/build/l2c-run (make cpp)",
}
L2C_RUN = REPO / "cpp" / "build" / "l2c-run"
MARKER = re.compile(r"^<!-- needs: ([^:>]+?)(?::\s*(.+?))?\s*-->$")


@dataclass(frozen=True)
class Block:
    """One fenced block: its file, the line of its opening fence (1-based), its language and text, and what the
    marker line before it says it needs (None: unmarked)."""
    path: Path
    line: int
    language: str
    code: str
    needs: str | None
    reason: str | None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    lines = path.read_text().split("\n")
    blocks, index = [], 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("```"):
            language = line[3:].strip()
            end = next((j for j in range(index + 1, len(lines)) if lines[j] == "```"), None)
            assert end is not None, f"{path.relative_to(REPO)}:{index + 1}: a code fence is never closed"
            marker = MARKER.match(lines[index - 1]) if index else None
            blocks.append(Block(path, index + 1, language, "\n".join(lines[index + 1:end]) + "\n",
                                marker.group(1) if marker else None, marker.group(2) if marker else None))
            index = end + 1
        else:
            index += 1
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in fenced_blocks(path)]
RUNNABLE = [block for block in ALL_BLOCKS if block.language in RUN]


# ------------------------------------------------------------------------------------------------------------------
# Shape of the docs: short README, every block runnable or marked, every link resolves.

def test_the_readme_is_short_and_links_the_pages():
    text = (REPO / "README.md").read_text()
    assert text.count("\n") <= README_MAX_LINES
    for page in PAGES:
        if page.name != "README.md":
            assert f"docs/{page.name}" in text, f"README.md does not link docs/{page.name}"


def test_every_page_is_in_the_docs_index():
    index = (REPO / "docs" / "README.md").read_text()
    for page in PAGES:
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not list {page.name}"


def test_every_block_runs_or_says_what_it_needs():
    known = set(RUN) | COMPILED | NEVER_RUN
    for block in ALL_BLOCKS:
        if block.needs is not None:
            assert block.needs in NEEDS, f"{block.name}: needs {block.needs!r}; expected one of {sorted(NEEDS)}"
            assert block.language not in NEVER_RUN, f"{block.name}: a ```text block is never run; drop its marker"
        else:
            assert block.language in known, (f"{block.name}: a ```{block.language} block that is neither run nor "
                                              f"marked <!-- needs: ... -->; output and formats are ```text")
    assert sum(block.needs is None for block in RUNNABLE) >= 12


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.S | re.M)
    return {_slug(match) for match in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for path in DOC_FILES:
        text = re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists():
                broken.append(f"{path.relative_to(REPO)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# ------------------------------------------------------------------------------------------------------------------
# The blocks, run.

@pytest.fixture(scope="module")
def docs_work(default_build, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The folder every block runs in, and its environment: the embedded default's build where `l2c-export build`
    puts it, `l2c_export/` and `cpp/` linked from the repository (the docs' paths are the repository root's), `$DIR` a
    tiny PixArt folder with a T5 encoder, tokenizer and VAE (tests/diffusers_pipelines.py), and `l2c-export` on PATH
    running this tree's code."""
    from .diffusers_pipelines import save_tiny_pipeline

    work = tmp_path_factory.mktemp("docs")
    shutil.copytree(default_build, work / "engines" / "dit-digits-onnxruntime-fp32")
    for name in ("l2c_export", "cpp"):
        (work / name).symlink_to(REPO / name, target_is_directory=True)
    folder = save_tiny_pipeline(tmp_path_factory.mktemp("folder") / "my-pixart", "pixart-t5-words", "dpm")
    bin_dir = tmp_path_factory.mktemp("bin")
    command, variables = cli_command()
    (bin_dir / "l2c-export").write_text(f'#!/bin/sh\nexec {shlex.join(command)} "$@"\n')
    (bin_dir / "l2c-export").chmod(0o755)
    env = {**os.environ, **variables, "DIR": str(folder), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
           "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    return work, env


def _runs_here(block: Block) -> bool:
    return block.needs is None or (block.needs == "cpp build" and L2C_RUN.is_file())


@pytest.mark.slow  # a learn, builds, verify and runs of the whole walk: about 90 s on 2 cores
def test_every_runnable_block_runs_as_written_in_document_order(docs_work):
    """One test, the blocks in order (the README first: later pages use its build, engines/mine), so that however the
    suite is spread over workers the blocks share one folder and run after the blocks they build on. Stops at the
    first block that fails, naming it."""
    work, env = docs_work
    python, python_variables = python_command()  # the CLI's fork server: no fresh import of diffusers per block
    ran = []
    for block in RUNNABLE:
        if not _runs_here(block):
            continue
        command, variables = ((["bash", "-euo", "pipefail", "-c", block.code], {}) if RUN[block.language] == "bash"
                              else ([*python, "-c", block.code], python_variables))
        result = subprocess.run(command, cwd=work, env={**env, **variables}, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, (f"{block.name} failed ({result.returncode}) after {len(ran)} blocks ran:\n"
                                        f"{block.code}\n{result.stderr[-4000:]}")
        ran.append(block.name)
    assert len(ran) >= 12, ran
    # What the walk leaves, as the pages say: the flow's build and image, the by-hand digits, int8, a Triton repository.
    for made in ("prompts.npz", "engines/mine/manifest.json", "digits.png", "engines/digits-int8/manifest.json",
                 "triton-repo/mine/config.pbtxt"):
        assert (work / made).is_file(), made
    assert (work / "seven.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"ran {len(ran)} blocks; not run here: "
          + "; ".join(f"{block.name} (needs {block.needs})" for block in RUNNABLE if not _runs_here(block)))


CPP_BLOCKS = [block for block in ALL_BLOCKS if block.language in COMPILED]


@pytest.mark.parametrize("block", CPP_BLOCKS, ids=[block.name for block in CPP_BLOCKS])
def test_the_cpp_block_compiles(block, tmp_path):
    """A fragment: its #include lines at file scope, the rest as the body of main; syntax and types only."""
    compiler = shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler here")
    includes = [line for line in block.code.splitlines() if line.startswith("#include")]
    body = [line for line in block.code.splitlines() if not line.startswith("#include")]
    source = tmp_path / "block.cpp"
    source.write_text("\n".join([*includes, "int main() {", *body, "return 0;", "}"]) + "\n")
    result = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", f"-I{REPO / 'cpp' / 'include'}", str(source)],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"{block.name} does not compile:\n{block.code}\n{result.stderr}"
