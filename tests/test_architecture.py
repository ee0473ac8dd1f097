"""The house rules, checked on the source: no import cycles, one-way layers, small modules, recipes over libraries.

Imports are read with `ast`, including those inside functions (they run too, only later); imports under
`if TYPE_CHECKING:` are left out because they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "runner"
MAX_LINES = 500
LIBRARIES = ("agents", "data", "model", "scoring", "serving", "training")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path) -> set[str]:
    """The runner modules `path` imports, at any depth of the file, outside TYPE_CHECKING blocks."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                found.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in MODULES and m != me}


GRAPH = {m: imports_of(p) for m, p in MODULES.items()}


def closure(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        m = todo.pop()
        for n in GRAPH[m]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            strong(v)
    return out


def test_the_walker_sees_imports_inside_functions_and_skips_type_checking(tmp_path: Path) -> None:
    # The rules below are only as good as the walker: check it on the modules it must see through.
    assert "runner.workloads.model.loading" in GRAPH["runner.workloads.agents.sources"]  # a function-level import
    assert "runner.plan" in GRAPH["runner.backends"]
    assert "runner.plan" not in GRAPH["runner.backends.base"]  # only under TYPE_CHECKING there


def test_no_import_cycles() -> None:
    found = cycles()
    assert not found, "import cycles (each line one cycle):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_plan_never_imports_a_backend() -> None:
    reach = closure("runner.plan")
    assert not {m for m in reach if m.startswith("runner.backends")}, sorted(reach)


def test_backends_do_not_import_each_other() -> None:
    from runner.backends import BACKENDS

    backends = {target.split(":")[0] for target in BACKENDS.values()}
    for m in backends:
        others = (GRAPH[m] & backends) - {m}
        assert not others, f"{m} imports {sorted(others)}: shared pieces go to backends/base.py or a leaf module"


def test_model_loading_imports_no_training_data_or_scoring() -> None:
    reach = closure("runner.workloads.model.loading")
    bad = {m for m in reach if m.startswith(("runner.workloads.training", "runner.workloads.data",
                                             "runner.workloads.scoring", "runner.workloads.recipes"))}
    assert not bad, f"model loading reaches {sorted(bad)}"


def test_libraries_never_import_recipes() -> None:
    for lib in LIBRARIES:
        for m in [m for m in MODULES if m.startswith(f"runner.workloads.{lib}")]:
            bad = {n for n in GRAPH[m] if n.startswith("runner.workloads.recipes")}
            assert not bad, f"{m} imports recipes {sorted(bad)}"


def test_host_side_never_imports_the_workloads() -> None:
    # The CLI side reaches torch code only through a subprocess (`python -m runner.workloads...`).
    for m in MODULES:
        if m.startswith("runner.workloads"):
            continue
        bad = {n for n in GRAPH[m] if n.startswith("runner.workloads")}
        assert not bad, f"{m} imports {sorted(bad)}"


def test_every_recipe_has_one_run_entry_and_the_dispatcher_names_it() -> None:
    from runner.spec import JOB_MODELS
    from runner.workloads.__main__ import RECIPES

    assert set(RECIPES) == set(JOB_MODELS), "every job kind has a recipe, and every recipe a job kind"
    for module in RECIPES.values():
        tree = ast.parse(MODULES[module].read_text())
        runs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
        assert len(runs) == 1 and [a.arg for a in runs[0].args.args] == ["job", "run_dir"], module


def test_workloads_top_level_is_the_dispatcher_and_packages() -> None:
    top = PKG / "workloads"
    files = sorted(p.name for p in top.iterdir() if p.is_file() and p.suffix == ".py")
    assert files == ["__init__.py", "__main__.py"]
    packages = sorted(p.name for p in top.iterdir() if (p / "__init__.py").exists())
    assert packages == sorted([*LIBRARIES, "recipes"])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module: str) -> None:
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {n} lines (at most {MAX_LINES}): split it"
