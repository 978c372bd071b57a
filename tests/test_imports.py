"""Imports go one way, from the CLI down to the data layer (DESIGN: layout), and the import graph has no cycles.

Function-local imports count too: a lazy import hides a cycle from Python but not from a reader.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lower layers never import higher ones; modules of one layer may import each other (without cycles).
LAYERS: dict[str, int] = {
    "alnus": 0,
    "alnus.errors": 0,
    "alnus._io": 1,
    "alnus._hardware": 1,
    "alnus._stats_base": 1,
    "alnus._firth": 1,
    "alnus.runfolder": 1,
    "alnus.operating_point": 1,
    "alnus.reader_rule": 1,
    "alnus._text": 1,
    "alnus._levels": 1,
    "alnus._checkpoint": 1,
    "alnus._distributed": 1,
    "alnus._mrmc": 2,
    "alnus.stats": 2,
    "alnus.data": 2,
    "alnus.data.images": 2,
    "alnus.data.roi": 2,
    "alnus.data.masks": 2,
    "alnus.data.augment": 2,
    "alnus.data.manifest": 2,
    "alnus.data.split": 2,
    "alnus.data.dataset": 2,
    "alnus.data.importers": 2,
    "alnus.data.phantom": 2,
    "alnus.data.inputs": 2,
    "alnus.data.tta": 2,
    "alnus.data.grey": 2,
    "alnus.data.seen": 2,
    "alnus.models": 3,
    "alnus.models.registry": 3,
    "alnus.models.weights": 3,
    "alnus.models.factory": 3,
    "alnus.models.mixstyle": 3,
    "alnus.models.package": 3,
    "alnus.config": 4,
    "alnus.readers": 5,
    "alnus.reader_target": 5,
    "alnus.shape_target": 5,
    "alnus.combine": 5,
    "alnus.train": 5,
    "alnus.predict": 5,
    "alnus.evaluate": 5,
    "alnus.explain": 5,
    "alnus.export": 5,
    "alnus.ensemble": 5,
    "alnus.report": 6,
    "alnus.report._style": 5,
    "alnus.report.flow": 5,
    "alnus.report.figures": 5,
    "alnus.report._history": 5,
    "alnus.report._inputs": 6,
    "alnus.report.tables": 6,
    "alnus.report.claim": 6,
    "alnus.report.card": 6,
    "alnus.report.methods": 6,
    "alnus.report.build": 6,
    "alnus.study": 6,
    "alnus.cv": 6,
    "alnus.subgroups": 6,
    "alnus.adapt": 6,
    "alnus.serve": 6,
    "alnus.serve.app": 6,
    "alnus.serve.clients": 6,
    "alnus.serve.security": 6,
    "alnus.serve.server": 6,
    "alnus.serve.service": 6,
    "alnus.serve.uploads": 6,
    "alnus.cli": 7,
    "alnus.__main__": 8,
}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Each module of src/alnus -> the alnus modules it imports (`from alnus import stats` counts as alnus.stats)."""
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in files else node.module)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle() -> None:
    """The checker itself can fail: a -> b -> c -> a is found, a tree is not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_has_no_cycles() -> None:
    """Issue 7.16: no import cycle in src/alnus (study <-> train, stats <-> _mrmc, registry <-> weights were)."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_module_has_a_layer() -> None:
    """A new module must be placed in LAYERS, so that the direction of its imports is checked."""
    graph = import_graph()
    missing = sorted(set(graph) - set(LAYERS))
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"
    gone = sorted(set(LAYERS) - set(graph))
    assert not gone, f"remove these modules from LAYERS (they no longer exist): {gone}"


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_imports_go_down(module: str) -> None:
    """Issue 7.16: no module imports one above it (CLI -> study -> stages -> config -> models -> data -> base)."""
    upward = sorted(d for d in import_graph().get(module, ()) if LAYERS.get(d, 99) > LAYERS[module])
    assert not upward, f"{module} (layer {LAYERS[module]}) imports higher layers: {upward}"


def test_predicting_an_image_does_not_import_the_statistics_stack(tmp_path: Path) -> None:
    """`alnus predict` pays for torch, timm and torchvision; scipy.stats and sklearn (about 2 s more on 2 cores,
    through the readers' and the split's module-level imports) are needed only by a study's statistics."""
    import os
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    image = tmp_path / "lesion.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160), dtype=np.uint8)).save(image)
    package = SRC.parent / "models" / "breast-us-malignancy"
    code = (
        "import sys\nfrom alnus.cli import main\n"
        "sys.argv = ['alnus', 'predict', sys.argv[1], sys.argv[2], '--roi', '40,30,60,50']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    print('exit', exc.code)\n"
        "print('loaded', *sorted({m.split('.')[0] + ('.stats' if m.startswith('scipy.stats') else '')"
        " for m in sys.modules if m.startswith(('scipy.stats', 'sklearn'))}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(package), str(image)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert "1 of 1 image(s) predicted" in done.stderr + done.stdout, (done.stdout, done.stderr)
    assert done.stdout.strip().splitlines()[-1] == "loaded", done.stdout
