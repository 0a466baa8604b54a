"""The package's architecture, checked: imports point one way, no cycle, no module over 400 lines.

Every import statement counts, wherever it is: at the top, inside a function, or under
``TYPE_CHECKING``. A module of one layer may import its own layer and the layers below it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import decouple

PACKAGE = Path(decouple.__file__).resolve().parent

# Each subpackage (or top-level module) and its rank: it may import only lower ranks, or itself.
LAYERS = {
    "factor": 0,  # the math: tensors in, tensors out
    "models": 0,  # the architecture registry, a leaf
    "nn": 1,  # the layers
    "demo": 1,  # the bundled demo model and data
    "surgery": 2,  # config, methods, BN folding, decouple_, recipes
    "calibrate": 3,
    "runtime": 3,
    "io": 3,
    "plan": 4,  # budgets: uses calibration's refits and the runtime's clocks
    "pipeline_result": 4.5,  # what compress_ returns: above the plans it holds, below compress_
    "pipeline": 5,
    "report": 5,
    "predicted_speed": 4,  # the cost model's verdict on a plan, which the report prints
    "agreement": 6,  # --max-change: a search over pipeline runs
    "cli": 7,
}
# Re-export or launch only; nothing inside the package may import them.
FACADES = {"decouple", "decouple.__main__", "decouple.compress"}
MAX_LINES = 400

# decouple.__all__ before the package was split into subpackages: every name must still import.
PUBLIC_BEFORE_SPLIT = [
    "CPConv2d", "DecoupleConfig", "DecoupledConv2d", "Decoupling", "LayerRecord", "LatencyConfig",
    "LayerSpec", "Report", "apply_recipe_", "TuckerConv2d", "build_report", "choose_realizations_",
    "confirm_on_model_", "count_flops", "cp_weight", "decouple_", "decouple_weight",
    "load_decoupled", "make_recipe", "max_rank", "measure", "rank_for_energy", "spectrum",
    "tucker2_weight",
]  # fmt: skip


def module_name(path: Path) -> str:
    parts = ["decouple", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports, anywhere in its file; never its own ancestors
    (a package's ``__init__`` is running already when its modules load)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + (node.module.split(".") if node.module else []))
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            parts = t.split(".")
            for i in range(2, len(parts) + 1):  # the subpackages it passes through load too
                found.add(".".join(parts[:i]))
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in known and m != name and m not in ancestors}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, …, a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def group(name: str) -> str:
    return name.split(".")[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the layering, as ``"a -> b"``."""
    bad = []
    for a, targets in graph.items():
        if a in FACADES:
            continue
        for b in targets:
            if b in FACADES:
                bad.append(f"{a} -> {b} (a facade)")
            elif group(a) != group(b) and LAYERS[group(b)] >= LAYERS[group(a)]:
                bad.append(f"{a} -> {b}")
    return sorted(bad)


def test_the_checks_catch_a_planted_cycle_and_an_upward_import():
    graph = {
        "decouple.factor.a": {"decouple.nn.b"},  # upward
        "decouple.nn.b": {"decouple.surgery.c"},  # upward
        "decouple.surgery.c": {"decouple.factor.a"},
    }
    assert find_cycle(graph) == [
        "decouple.factor.a", "decouple.nn.b", "decouple.surgery.c", "decouple.factor.a"
    ]  # fmt: skip
    assert upward_imports(graph) == [
        "decouple.factor.a -> decouple.nn.b",
        "decouple.nn.b -> decouple.surgery.c",
    ]
    assert find_cycle({"decouple.nn.b": {"decouple.factor.a"}, "decouple.factor.a": set()}) is None


def test_relative_imports_resolve_to_package_modules(tmp_path):
    known = {"decouple.plan.options", "decouple.plan", "decouple.nn", "decouple.nn.flops"}
    src = tmp_path / "options.py"
    src.write_text(
        "from ..nn.flops import count_flops\n"
        "def f():\n    from .allocate import allocate\n"
        "if TYPE_CHECKING:\n    from decouple.nn import flops\n"
    )
    assert imports_of("decouple.plan.options", src, known) == {"decouple.nn", "decouple.nn.flops"}


def test_every_module_belongs_to_a_layer():
    unknown = {group(n) for n in modules() if n not in FACADES} - set(LAYERS)
    assert not unknown, f"give these a rank in LAYERS: {sorted(unknown)}"


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_pipeline():
    bad = upward_imports(import_graph())
    assert not bad, "imports against the layering: " + "; ".join(bad)


def test_each_subpackage_says_what_it_may_import_and_keeps_to_it():
    graph = import_graph()
    for sub in sorted({group(n) for n in graph if n not in FACADES}):
        init = PACKAGE / sub / "__init__.py"
        if not init.exists():
            continue  # a top-level module
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc, f"decouple/{sub}/__init__.py has no docstring"
        if "everything" in doc or sub in ("models", "demo"):
            continue
        used = {
            group(b) for a, bs in graph.items() if a not in FACADES and group(a) == sub for b in bs
        } - {sub}
        unnamed = sorted(u for u in used if f"decouple.{u}" not in doc)
        assert not unnamed, f"decouple.{sub} imports {unnamed}; its docstring does not say so"


def test_subpackages_hold_the_code():
    mods = modules()
    subs = {
        g: [n for n in mods if n.startswith(f"decouple.{g}.")]
        for g in LAYERS
        if (PACKAGE / g).is_dir()
    }
    assert sum(len(v) >= 2 for v in subs.values()) >= 4, subs


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_over_the_limit(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it"


def test_the_public_names_still_import_from_the_top():
    missing = [n for n in PUBLIC_BEFORE_SPLIT if not hasattr(decouple, n)]
    assert not missing
    assert set(PUBLIC_BEFORE_SPLIT) <= set(decouple.__all__)
    assert decouple.compress_ is decouple.pipeline.compress_


def test_the_old_compress_module_warns_and_points_to_the_new_place():
    import decouple.compress as old
    import decouple.pipeline
    import decouple.plan.flops_budget

    with pytest.warns(DeprecationWarning, match=r"decouple\.pipeline\.compress_"):
        from decouple.compress import compress_
    assert compress_ is decouple.pipeline.compress_
    with pytest.warns(DeprecationWarning, match=r"decouple\.plan\.flops_budget"):
        assert old.plan_ranks is decouple.plan.flops_budget.plan_ranks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImportError):
            from decouple.compress import no_such_name  # noqa: F401


def test_python_m_decouple_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "decouple", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: decouple")
