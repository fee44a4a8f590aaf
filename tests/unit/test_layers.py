"""The kernel's layers (docs/architecture.md): every module imports only from its own layer or
those below, there is no import cycle — imports inside functions included — and no kernel
module imports a plugin."""

from __future__ import annotations

import ast
from pathlib import Path

import unfog

KERNEL = Path(unfog.__file__).resolve().parent

# Bottom to top; a module may import from its layer and the ones before it.
LAYERS: list[tuple[str, set[str]]] = [
    ("protocols and errors", {"unfog.errors", "unfog.protocols", "unfog.util"}),
    ("registry and config", {"unfog", "unfog.registry", "unfog.config", "unfog.schemas"}),
    ("diffusion math and data", {"unfog.diffusion", "unfog.timesteps", "unfog.data", "unfog.images", "unfog.audio"}),
    ("building and sampling", {"unfog.model", "unfog.building", "unfog.sampling", "unfog.checkpoints",
                               "unfog.latents"}),
    ("pipeline", {"unfog.pipeline"}),
    ("evaluation and export", {"unfog.evaluation", "unfog.export"}),
    ("training and callbacks", {"unfog.training", "unfog.loggers", "unfog.callbacks", "unfog.testing"}),
    ("commands", {"unfog.commands", "unfog.commands.base", "unfog.commands.hydra_app", "unfog.commands.train",
                  "unfog.commands.sample", "unfog.commands.evaluate", "unfog.commands.export",
                  "unfog.commands.config", "unfog.commands.components", "unfog.commands.plugins"}),
    ("command line", {"unfog.cli"}),
]


def _modules() -> dict[str, set[str]]:
    """Every kernel module and the modules it imports, anywhere in its body."""
    out: dict[str, set[str]] = {}
    for f in sorted(KERNEL.rglob("*.py")):
        name = ".".join(("unfog", *f.relative_to(KERNEL).with_suffix("").parts)).removesuffix(".__init__")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
        out[name] = deps
    return out


def _kernel_deps(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: {d for d in deps if d in modules and d != m} for m, deps in modules.items()}


def test_every_kernel_module_has_a_layer() -> None:
    placed = set().union(*(mods for _, mods in LAYERS))
    assert set(_modules()) == placed, "place new kernel modules in LAYERS (and docs/architecture.md)"


def test_no_kernel_module_imports_a_plugin() -> None:
    bad = {m: sorted(d for d in deps if d.split(".")[0].startswith("unfog_")) for m, deps in _modules().items()}
    assert not {m: d for m, d in bad.items() if d}


def test_imports_go_down_the_layers_only() -> None:
    level = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}
    upward = [f"{m} ({LAYERS[level[m]][0]}) imports {d} ({LAYERS[level[d]][0]})"
              for m, deps in _kernel_deps(_modules()).items() for d in deps
              if d != "unfog" and level[d] > level[m]]
    assert not upward, "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = _kernel_deps(_modules())
    graph = {m: {d for d in deps if d != "unfog"} for m, deps in graph.items()}
    cycles, seen, stack = [], set(), []

    def visit(m: str) -> None:
        seen.add(m)
        stack.append(m)
        for d in sorted(graph[m]):
            if d in stack:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in seen:
                visit(d)
        stack.pop()

    for m in sorted(graph):
        if m not in seen:
            visit(m)
    assert not cycles, "\n".join(cycles)

