"""The package's imports look only down: no import circle inside dense_model/, no arrow to a higher layer.

The layers are the list in docs/architecture.md (the block after the ``layers`` marker, top first);
this test reads that list, so the page and the code cannot drift apart. Every module of dense_model/
is parsed with ``ast`` (nothing is imported), and every ``import``/``from ... import`` of a
dense_model module counts, wherever it stands: at the top, inside a function (a lazy import is still
an arrow: the module needs the other one to work), or under ``if TYPE_CHECKING``. Not counted:
the parent packages Python runs first when it imports ``a.b.c`` (``a`` and ``a.b``: every module of
a package would otherwise import its package's ``__init__``), names that are not modules of the tree
(``export/modeling_dense_model.py``'s ``.activation_dense_model`` is written next to it on export),
and ``__main__`` modules (``python -m`` entry points: never imported; each sits on its package's
floor, so ``python -m pkg`` runs nothing above ``pkg``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "dense_model"
LAYERS_MARKER = "<!-- layers"


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``root/dense_model`` (packages by their __init__)."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The dense_model modules that module ``name`` (file ``path``) imports, at any level of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y, from .. import z
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
            # from pkg import module / from module import name; the former also runs pkg's __init__
            # (the root package's imports nothing of ours)
            runs_init = submodules and base in known and base != PACKAGE
            candidates = [*submodules, base] if runs_init else submodules or [base]
        else:
            continue
        for target in candidates:
            if target.split(".")[0] != PACKAGE:
                continue
            while target and target not in known and "." in target:  # import a.b.c.name -> a.b.c
                target = target.rpartition(".")[0]
            if target in known and target != name and (target != PACKAGE or node_names_root(node)):
                targets.add(target)
    return targets


def node_names_root(node: ast.AST) -> bool:
    """``import dense_model`` or ``from dense_model import __version__``: the root package itself."""
    if isinstance(node, ast.Import):
        return any(alias.name == PACKAGE for alias in node.names)
    return isinstance(node, ast.ImportFrom) and node.module == PACKAGE and node.level == 0


def import_graph(root: Path) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imported_modules(name, path, set(found)) for name, path in found.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, as one closed path per strongly connected component (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(closed_path(graph, set(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def closed_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One circle through a strongly connected component: a -> b -> ... -> a (breadth-first)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & component):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    raise AssertionError(f"no circle through {sorted(component)}")


def read_layers(doc: Path) -> list[tuple[str, list[str]]]:
    """(layer name, module patterns) from docs/architecture.md's layer block, bottom first.

    The block is the first fenced block after the ``<!-- layers`` marker; each line is
    ``name  pattern pattern ...``, the top layer first. A pattern is a module and its submodules.
    """
    text = doc.read_text()
    assert LAYERS_MARKER in text, f"{doc} has no '{LAYERS_MARKER}' marker before its layer block"
    block = re.search(r"```[a-z]*\n(.*?)```", text[text.index(LAYERS_MARKER) :], re.S)
    assert block, f"{doc}: no fenced block after the layers marker"
    layers = []
    for line in block.group(1).splitlines():
        words = line.split()
        if words:
            layers.append((words[0], words[1:]))
    return layers[::-1]


def layer_of(module: str, layers: list[tuple[str, list[str]]]) -> int | None:
    """The index (0 = bottom) of the layer whose pattern matches ``module`` most closely; the root
    package's pattern matches the root package only; a ``__main__`` module sits on its package's layer
    (``python -m dense_model.config`` once ran the launcher, an entry-floor module, from the config floor)."""
    if module.endswith(".__main__"):
        module = module[: -len(".__main__")]
    best, best_len = None, -1
    for i, (_, patterns) in enumerate(layers):
        for pattern in patterns:
            if pattern == PACKAGE and module != PACKAGE:
                continue
            if (module == pattern or module.startswith(pattern + ".")) and len(pattern) > best_len:
                best, best_len = i, len(pattern)
    return best


def upward_arrows(graph: dict[str, set[str]], layers: list[tuple[str, list[str]]]) -> list[str]:
    arrows = []
    for source in sorted(graph):
        for target in sorted(graph[source]):
            low, high = layer_of(source, layers), layer_of(target, layers)
            if low is not None and high is not None and high > low:
                arrows.append(f"{source} (layer {layers[low][0]}) -> {target} (layer {layers[high][0]})")
    return arrows


GRAPH = import_graph(REPO)
LAYERS = read_layers(REPO / "docs" / "architecture.md")


def test_no_import_circle():
    cycles = find_cycles(GRAPH)
    assert not cycles, "import circles inside dense_model/:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_module_has_a_layer_and_every_layer_a_module():
    unplaced = [m for m in GRAPH if layer_of(m, LAYERS) is None]
    assert not unplaced, f"modules in no layer of docs/architecture.md (add them to its list): {unplaced}"
    stale = [p for _, patterns in LAYERS for p in patterns if p not in GRAPH]
    assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"


def test_imports_only_look_down():
    arrows = upward_arrows(GRAPH, LAYERS)
    assert not arrows, "imports that climb to a higher layer (docs/architecture.md):\n" + "\n".join(arrows)


def test_the_graph_sees_lazy_relative_and_package_imports():
    """The parser's own cases, on modules whose imports are known: a function-local import
    (model -> moe), a TYPE_CHECKING import (parallel -> config), ``from dense_model import
    collectives`` (a submodule, not the root package), a relative import in the export folder."""
    assert "dense_model.moe" in GRAPH["dense_model.model"]
    assert "dense_model.config" in GRAPH["dense_model.parallel"]
    assert (
        "dense_model.collectives" in GRAPH["dense_model.moe"]
        and "dense_model" not in GRAPH["dense_model.moe"]
    )
    assert "dense_model.export.configuration_dense_model" in GRAPH["dense_model.export.modeling_dense_model"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
