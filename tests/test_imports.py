"""The package's stages import downward only (the order in ``l2c_export/stages.py``), and the runtime stays torch-free.

Every module is read with ``ast`` (nothing is imported): each ``import``/``from ... import`` anywhere in it, at the top
level or inside a function, absolute or relative, is resolved to the ``l2c_export`` module it names.
"""

from __future__ import annotations

import ast
from pathlib import Path

from l2c_export.stages import STAGES, TORCH_FREE_STAGES, TORCH_MODULES

PACKAGE = Path(__file__).resolve().parents[1] / "l2c_export"
TORCH_PACKAGES = ("torch", "diffusers", "transformers")


def module_name(path: Path) -> tuple[str, bool]:
    """``l2c_export/a/b.py`` -> ("l2c_export.a.b", False); ``.../a/__init__.py`` -> ("l2c_export.a", True)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def imported_modules(source: str, module: str, is_package: bool,
                     typing_only: bool = True) -> list[tuple[int, str, bool]]:
    """(line, the module named, whether at the top level) for every import in ``source``: ``from .x import y``
    resolved against ``module``; for ``from pkg import name`` both ``pkg`` and ``pkg.name`` are listed (``name`` may
    be a submodule). ``typing_only`` False leaves out the imports under ``if TYPE_CHECKING:`` (never run)."""
    tree = ast.parse(source)
    top_level = {id(node) for node in tree.body}
    if not typing_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            found.append((node.lineno, base, id(node) in top_level))
            found += [(node.lineno, f"{base}.{alias.name}", id(node) in top_level) for alias in node.names]
    return found


def stage_of(module: str) -> str | None:
    """The stage of an ``l2c_export`` module (its first sub-package), or None for the package itself and
    ``l2c_export.stages``, which import nothing of the package at the top and stand outside the order."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def climbing_imports(source: str, module: str, is_package: bool, known: set[str]) -> list[str]:
    """What in ``source`` (module ``module``) breaks the order: an import of a higher stage; in a torch-free stage,
    an import of a stage that is not torch-free, or of PyTorch itself, or a top-level import of a PyTorch module
    (unless ``module`` is one). ``known``: the package's modules, so that ``from pkg import name`` counts only
    where ``pkg.name`` is a module."""
    stage = stage_of(module)
    problems = []
    if stage is None:
        return problems
    for line, name, top in imported_modules(source, module, is_package):
        if name.startswith("l2c_export.") and name not in known and name.rsplit(".", 1)[0] in known:
            continue  # a name imported from a module, not a module
        where = f"{module}:{line} imports {name}"
        target = stage_of(name) if name.startswith("l2c_export.") else None
        if target is not None and STAGES.index(target) > STAGES.index(stage):
            problems.append(f"{where}: stage {target!r} is above {stage!r}")
        if stage in TORCH_FREE_STAGES and module not in TORCH_MODULES:
            if target is not None and target not in TORCH_FREE_STAGES:
                problems.append(f"{where}: stage {target!r} is not torch-free, {stage!r} is")
            if top and name.split(".")[0] in TORCH_PACKAGES:
                problems.append(f"{where}: the {stage!r} stage is torch-free")
            if top and name in TORCH_MODULES:
                problems.append(f"{where}: a PyTorch module, imported at the top of a torch-free one")
    return problems


def same_stage_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The cycles among modules of one stage (``edges``: module -> the modules of its own stage it imports)."""
    cycles, done = [], set()

    def visit(node: str, path: list[str]):
        if node in path:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for successor in sorted(edges.get(node, ())):
            visit(successor, path + [node])
        done.add(node)

    for node in sorted(edges):
        visit(node, [])
    return cycles


def package_modules() -> dict[str, tuple[str, bool]]:
    """module name -> (its source, whether a package ``__init__``), for every module of ``l2c_export``."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name, is_package = module_name(path)
        modules[name] = (path.read_text(), is_package)
    return modules


def test_every_stage_of_the_order_is_a_folder_of_the_package():
    folders = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    assert set(STAGES) == folders - {"schemas"}


def test_no_module_imports_a_higher_stage_or_torch_from_the_runtime():
    modules = package_modules()
    known = set(modules)
    problems = [problem for name, (source, is_package) in modules.items()
                for problem in climbing_imports(source, name, is_package, known)]
    assert not problems, "\n".join(problems)


def test_modules_of_one_stage_do_not_import_each_other_in_a_cycle():
    modules = package_modules()
    known = set(modules)
    edges: dict[str, set[str]] = {}
    for name, (source, is_package) in modules.items():
        for _, target, _ in imported_modules(source, name, is_package, typing_only=False):
            if target in known and target != name and stage_of(target) == stage_of(name) is not None \
                    and not name.startswith(target + "."):  # a submodule importing its own package's __init__
                edges.setdefault(name, set()).add(target)
    assert not same_stage_cycles(edges), same_stage_cycles(edges)


def test_a_build_runs_only_code_of_the_stages_its_key_hashes():
    """``builder.reuse.exporter_digest`` hashes the sources of ``EXPORTER_STAGES``: everything a build imports,
    directly or through others (inside functions too), must be there, or a change to it would not rebuild."""
    from l2c_export.builder.reuse import EXPORTER_STAGES

    modules = package_modules()
    known = set(modules)
    reached, todo = set(), ["l2c_export.builder.build"]
    while todo:
        name = todo.pop()
        if name in reached or name not in known:
            continue
        reached.add(name)
        source, is_package = modules[name]
        todo += [target for _, target, _ in imported_modules(source, name, is_package, typing_only=False)]
        todo += [name.rsplit(".", 1)[0]]  # importing a module runs its package's __init__
    outside = sorted(name for name in reached if stage_of(name) not in EXPORTER_STAGES and stage_of(name))
    assert not outside, outside


def test_the_check_fails_on_a_climbing_import_at_the_top_or_inside_a_function():
    known = {"l2c_export.core.schedule", "l2c_export.samplers", "l2c_export.runtime.conditioning",
             "l2c_export.models", "l2c_export.runtime.backends.torch", "l2c_export.runtime.pipeline"}
    top = "from ..samplers import SAMPLER_KINDS\n"
    assert climbing_imports(top, "l2c_export.core.schedule", False, known) == [
        "l2c_export.core.schedule:1 imports l2c_export.samplers: stage 'samplers' is above 'core'"]
    inside = "def f():\n    from ..runtime.conditioning import batch_conditioning\n"
    assert climbing_imports(inside, "l2c_export.samplers.reference", False, known) == [
        "l2c_export.samplers.reference:2 imports l2c_export.runtime.conditioning: stage 'runtime' is above "
        "'samplers'"]
    absolute = "import l2c_export.models\n"
    assert climbing_imports(absolute, "l2c_export.samplers.x", False, known)[0].endswith("is above 'samplers'")
    torch_in_runtime = "import numpy\nimport torch\nfrom ..models import get_family\n"
    assert [p.split(": ", 1)[1] for p in climbing_imports(torch_in_runtime, "l2c_export.runtime.pipeline", False,
                                                          known)] == [
        "the 'runtime' stage is torch-free", "stage 'models' is not torch-free, 'runtime' is"]
    assert climbing_imports(torch_in_runtime, "l2c_export.runtime.backends.torch", False, known) == []
    torch_backend_on_top = "from .backends.torch import TorchBackend\n"
    assert len(climbing_imports(torch_backend_on_top, "l2c_export.runtime.pipeline", False, known)) == 1
    lazily = "def load():\n    from .backends.torch import TorchBackend\n"
    assert climbing_imports(lazily, "l2c_export.runtime.pipeline", False, known) == []
    downward = "from ..core.schedule import Schedule\nfrom . import conditioning\n"
    assert climbing_imports(downward, "l2c_export.runtime.pipeline", False, known) == []


def test_every_sampler_kind_of_the_manifest_vocabulary_has_its_class_and_official_rule():
    from l2c_export.core.vocabulary import OFFICIAL_RULES, SAMPLER_KINDS
    from l2c_export.samplers import SAMPLERS, create_sampler

    assert tuple(SAMPLERS) == SAMPLER_KINDS == tuple(OFFICIAL_RULES)
    for kind in SAMPLER_KINDS:
        assert create_sampler(kind, 10).official_cache_calls() == OFFICIAL_RULES[kind](10)


def test_the_cycle_check_finds_two_modules_of_a_stage_importing_each_other():
    assert same_stage_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert same_stage_cycles({"a": {"b"}, "b": {"c"}}) == []
