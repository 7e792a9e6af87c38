"""The import graph follows the data flow: no circles, and no module imports a later stage.

Every `import` statement of src/mnistlab counts, module-level or inside a function (a lazy
import is a dependency too). Stages, earliest first; a module may import its own stage or an
earlier one. Within `experiment`, the order of its modules is its data flow as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
STAGES = [
    ["mnistlab._version", "mnistlab.errors", "mnistlab.inputs", "mnistlab.atomic",
     "mnistlab.suggest"],
    ["mnistlab.validation"],
    ["mnistlab.config"],
    ["mnistlab.data"],
    ["mnistlab.model"],
    ["mnistlab.modules"],
    # the engine, from the ground up to its face (mnistlab.engine's docstring maps it)
    ["mnistlab.engine.backends.triton_kernels", "mnistlab.engine.backends.cpu_kernels",
     "mnistlab.engine.backends.cuda_graphs", "mnistlab.engine.seeds", "mnistlab.engine.schedules",
     "mnistlab.engine.stopping"],
    ["mnistlab.engine.backends.arithmetic"],
    ["mnistlab.engine.backends.torch_ops"],
    ["mnistlab.engine.backends.fused_cpu", "mnistlab.engine.backends.fused_cuda"],
    ["mnistlab.engine.backends"],
    ["mnistlab.engine.device", "mnistlab.engine.stack", "mnistlab.engine.augment"],
    ["mnistlab.engine.records"],
    ["mnistlab.engine.resume", "mnistlab.engine.loop", "mnistlab.engine.module_stack"],
    ["mnistlab.engine.mlp", "mnistlab.engine.general"],
    ["mnistlab.engine.memory"],
    ["mnistlab.engine"],
    ["mnistlab.evaluation", "mnistlab.inference", "mnistlab.export", "mnistlab.stats",
     "mnistlab.claims", "mnistlab.progress", "mnistlab.board", "mnistlab.runs",
     "mnistlab.environment"],
    ["mnistlab.experiment.sweep"],
    ["mnistlab.experiment.trials"],
    ["mnistlab.experiment.plan"],
    ["mnistlab.experiment.executor"],
    ["mnistlab.experiment.ray", "mnistlab.experiment.halving"],
    ["mnistlab.experiment.summary"],
    ["mnistlab.experiment.pipeline", "mnistlab.experiment"],
    ["mnistlab.report"],
    ["mnistlab.results", "mnistlab.scored"],
    ["mnistlab.api"],
    ["mnistlab.cli", "mnistlab"],
]


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in sorted((SRC / "mnistlab").rglob("*.py"))}


def _stage(module: str) -> int:
    """The stage of a module: that of its longest listed prefix (a package covers its files)."""
    best = max((name for stage in STAGES for name in stage
                if module == name or module.startswith(name + ".")), key=len, default=None)
    assert best is not None, f"{module} is in no stage: add it to STAGES"
    return next(i for i, stage in enumerate(STAGES) if best in stage)


def _resolve(name: str) -> str | None:
    """The project module an import names (`mnistlab.data.load` → mnistlab.data)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """Every project module that `module` imports, anywhere in its code."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {m for n in names if n.startswith("mnistlab") and (m := _resolve(n))}
    return found - {module}


GRAPH = {m: imports(m) for m in MODULES}


def test_no_module_imports_a_later_stage():
    upward = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
              if _stage(b) > _stage(a)]
    assert upward == []


def test_there_are_no_import_circles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (circle := visit(nxt, [*path, node])):
                return circle
        state[node] = 2
        return None

    circles = [c for m in sorted(GRAPH) if m not in state and (c := visit(m, []))]
    assert circles == []


def test_only_the_engine_imports_its_modules():
    """The engine's face is `mnistlab.engine`: a module outside it imports that, never one of
    the modules behind it (mnistlab.engine.stack, mnistlab.engine.backends, ...)."""
    inside = [m for m in MODULES if m.startswith("mnistlab.engine.")]
    reaching_in = [f"{a} -> {b}" for a, targets in GRAPH.items() if a != "mnistlab.engine"
                   and not a.startswith("mnistlab.engine.") for b in targets if b in inside]
    assert inside and reaching_in == []


def test_the_walker_sees_lazy_imports():
    """A check that cannot fail is no check: the API's lazy import of the report counts."""
    assert "mnistlab.report" in GRAPH["mnistlab.api"]
    assert "mnistlab.experiment.ray" in GRAPH["mnistlab.api"]


MOST_LINES = 450  # a module one can read at once; past this it holds more than one idea


def test_no_module_is_too_long_to_read_at_once():
    long = {m: n for m, p in MODULES.items()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MOST_LINES}
    assert long == {}


def test_no_class_name_is_defined_twice():
    """One name per idea: two classes of one name (two `Stack`s, two `Layout`s) read as one."""
    where: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                where.setdefault(node.name, []).append(module)
    assert where and {name: mods for name, mods in where.items() if len(mods) > 1} == {}
