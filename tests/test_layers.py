"""The import structure of fedlora/, server/ and clients/: no circles, nothing reaching up (issue 10).

Every module is parsed with :mod:`ast` (nothing is imported), and every ``import`` in it --
at module level, under ``if TYPE_CHECKING``, or inside a function -- is an edge of the module
graph. The tests fail with a readable list on

- an import cycle (each one printed as a path, with the file and line of every hop);
- an import from a lower layer to a higher one, or between two packages of one layer that must
  stay apart (``server/`` and ``clients/``), by the table :data:`LAYERS`;
- a function-level (lazy) import of project code or of a third-party module that carries no
  comment saying why (on its line, or on the line above it or above the run of imports it opens);
- a module that no layer claims, or an import of a project module that does not exist.

The checker works on sources, not files, so that :func:`test_checker_on_a_synthetic_graph`
can show it failing on a made-up graph.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedlora", "server", "clients")

# Layers, low to high. A module may import from its own layer or a lower one, never from a higher
# one. A module's layer is that of the longest prefix below that names it or a package above it.
LAYERS: dict[int, tuple[str, ...]] = {
    # 0: what everything may use and which knows nothing of federated learning: seeds, the
    #    canonical bytes of signatures and messages, the typed config schema, the user-error type,
#    learning-rate schedules.
    0: ("fedlora.seeds", "fedlora.transcript", "fedlora.config", "fedlora.usage", "fedlora.schedule"),
    # 1: primitives and protocol state machines, no tier or deployment knowledge: the message
    #    codec, the typed round settings a device receives, the names of Flower message records,
    #    the secure-aggregation protocol, weighted sums.
    1: ("fedlora.wire", "fedlora.round_settings", "fedlora.protocol", "fedlora.secure", "fedlora.aggregate.sums"),
    # 2: the learning and the world it runs in: model, training, adapters, data, the cell tree,
    #    network and mobility model, strategies and DP, the run records, a run's settings resolved once,
    #    split learning's maths, adapter swapping over one base, quantising a frozen base,
    #    task accuracy (options by log-likelihood, generated answers).
    2: ("fedlora.model", "fedlora.quantize", "fedlora.train", "fedlora.adapters", "fedlora.data", "fedlora.world",
        "fedlora.split", "fedlora.aggregate", "fedlora.runs", "fedlora.run_settings", "fedlora.swap",
        "fedlora.tasks"),
    # 3: the roles of a round: device, neighbourhood, sub-urban, HierFAVG, cloud, local cells.
    3: ("fedlora.roles",),
    # 4: deployment: plan and node folders, keys, device facts, processes, launcher.
    4: ("fedlora.deploy",),
    # 5: the Flower apps, thin shells over the layers below.
    5: ("server", "clients"),
    # 6: the `fedlora` command, the top.
    6: ("fedlora.cli",),
}
# Packages of one layer that never import each other (either way).
APART: tuple[tuple[str, str], ...] = (("server", "clients"),)

MAX_CYCLES = 200  # enough to read; a graph with more has one knot to untie first


@dataclass(frozen=True)
class Edge:
    """One import statement's dependency: ``importer`` imports ``imported`` at ``path:line``."""

    importer: str
    imported: str
    path: str
    line: int
    lazy: bool  # inside a function

    def where(self) -> str:
        return f"{self.path}:{self.line}" + (" (in a function)" if self.lazy else "")


@dataclass
class Graph:
    """The parsed import structure of a set of modules."""

    modules: dict[str, str] = field(default_factory=dict)  # module name -> path, for messages
    edges: list[Edge] = field(default_factory=list)  # project-to-project edges
    silent_lazy: list[str] = field(default_factory=list)  # lazy imports with no why-comment
    missing: list[str] = field(default_factory=list)  # imports of project modules that do not exist


def module_name(rel: Path) -> tuple[str, bool]:
    """(dotted name, is a package) of the source file at ``rel`` (relative to the root)."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def project_sources(root: Path = ROOT) -> dict[str, tuple[str, bool, str]]:
    """Module name -> (path relative to ``root``, is a package, source) of every project module."""
    sources = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            name, is_package = module_name(rel)
            sources[name] = (str(rel), is_package, path.read_text())
    return sources


def _comment_lines(source: str) -> set[int]:
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {t.start[0] for t in tokens if t.type == tokenize.COMMENT}


def _statement_lists(node: ast.AST, in_function: bool = False):
    """Yield (statement list, inside a function) for every body in ``node``, outermost first."""
    inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    for _, value in ast.iter_fields(node):
        children = value if isinstance(value, list) else [value]
        if children and all(isinstance(c, ast.stmt) for c in children):
            yield children, inside
        for child in children:
            if isinstance(child, ast.AST):
                yield from _statement_lists(child, inside)


def _explained(body: list[ast.stmt], i: int, comments: set[int], lines: list[str]) -> bool:
    """Whether the import ``body[i]`` has a comment on its own lines or just above the block of
    imports that it belongs to (imports separated by blank lines at most, as isort groups them)."""
    node = body[i]
    if any(n in comments for n in range(node.lineno, node.end_lineno + 1)):
        return True
    first = i
    while first > 0 and isinstance(body[first - 1], (ast.Import, ast.ImportFrom)) \
            and not any(line.strip() for line in lines[body[first - 1].end_lineno:body[first].lineno - 1]):
        first -= 1
    above = body[first].lineno - 1
    return above >= 1 and lines[above - 1].lstrip().startswith("#")


def _loads(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[tuple[str, ...]]:
    """Per imported name, the dotted names it may come from, most specific first:
    ``import a.b`` loads ``a.b``; ``from a import b`` loads module ``a.b`` or a name of ``a``."""
    if isinstance(node, ast.Import):
        return [(alias.name,) for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [(f"{base}.{alias.name}", base) for alias in node.names]


def _resolve(candidates: tuple[str, ...], modules: set[str]) -> str | None:
    """The first of ``candidates`` that is a module here, if any."""
    return next((c for c in candidates if c in modules), None)


def build_graph(sources: dict[str, tuple[str, bool, str]]) -> Graph:
    """The import graph of ``sources`` (module name -> (path, is a package, source))."""
    graph = Graph(modules={name: path for name, (path, _, _) in sources.items()})
    names = set(sources)
    stdlib = set(sys.stdlib_module_names)
    for module, (path, is_package, source) in sorted(sources.items()):
        tree = ast.parse(source, filename=path)
        comments, lines = _comment_lines(source), source.splitlines()
        for body, lazy in _statement_lists(tree):
            for i, node in enumerate(body):
                if not isinstance(node, (ast.Import, ast.ImportFrom)) or getattr(node, "module", "") == "__future__":
                    continue
                ours = set()
                for candidates in _loads(node, module, is_package):
                    found = _resolve(candidates, names)
                    if found:
                        ours.add(found)
                    elif candidates[-1].split(".")[0] in PACKAGES:
                        graph.missing.append(f"{path}:{node.lineno} imports {candidates[-1]}, which is no module here")
                graph.edges += [Edge(module, t, path, node.lineno, lazy) for t in sorted(ours) if t != module]
                tops = {c[-1].split(".")[0] for c in _loads(node, module, is_package)}
                worth_a_reason = tops - stdlib  # project code or a third-party module
                if lazy and worth_a_reason and not _explained(body, i, comments, lines):
                    graph.silent_lazy.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return graph


def _adjacency(graph: Graph) -> dict[str, dict[str, list[Edge]]]:
    adj: dict[str, dict[str, list[Edge]]] = {m: {} for m in graph.modules}
    for e in graph.edges:
        adj[e.importer].setdefault(e.imported, []).append(e)
    return adj


def find_cycles(graph: Graph) -> list[list[str]]:
    """Every elementary import cycle (as a module path that ends where it starts), up to
    :data:`MAX_CYCLES`, each starting at its smallest module name."""
    adj = _adjacency(graph)
    cycles: list[list[str]] = []
    for start in sorted(adj):
        # Only nodes after `start` may appear inside: each cycle is found once, from its smallest node.
        stack = [(start, [start])]
        while stack and len(cycles) < MAX_CYCLES:
            node, path = stack.pop()
            for nxt in sorted(adj[node], reverse=True):
                if nxt == start:
                    cycles.append(path + [start])
                elif nxt > start and nxt not in path:
                    stack.append((nxt, path + [nxt]))
    return sorted(cycles, key=lambda c: (len(c), c))


def describe_cycle(graph: Graph, cycle: list[str]) -> str:
    adj = _adjacency(graph)
    hops = []
    for a, b in zip(cycle, cycle[1:]):
        edges = adj[a][b]
        more = f" (and {len(edges) - 1} more)" if len(edges) > 1 else ""
        hops.append(f"      {edges[0].where()}{more}: {a} imports {b}")
    return " -> ".join(cycle) + "\n" + "\n".join(hops)


def layer_of(module: str, layers: dict[int, tuple[str, ...]] = LAYERS) -> int | None:
    """The layer of ``module``: that of the longest prefix in ``layers`` naming it or a package above."""
    best, best_len = None, -1
    for layer, prefixes in layers.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


def _apart(a: str, b: str, apart: tuple[tuple[str, str], ...]) -> bool:
    def within(m: str, p: str) -> bool:
        return m == p or m.startswith(p + ".")
    return any((within(a, x) and within(b, y)) or (within(a, y) and within(b, x)) for x, y in apart)


def upward_imports(graph: Graph, layers: dict[int, tuple[str, ...]] = LAYERS,
                   apart: tuple[tuple[str, str], ...] = APART) -> list[str]:
    """Every import that reaches up a layer, or across packages that must stay apart."""
    found = []
    for e in graph.edges:
        low, high = layer_of(e.importer, layers), layer_of(e.imported, layers)
        if low is None or high is None:
            continue  # reported by test_every_module_has_a_layer
        if high > low:
            found.append(f"{e.where()}: {e.importer} (layer {low}) imports {e.imported} (layer {high})")
        elif _apart(e.importer, e.imported, apart):
            found.append(f"{e.where()}: {e.importer} imports {e.imported}, and these never import each other")
    return found


def _fail_with(title: str, items: list[str]) -> None:
    assert not items, f"{title} ({len(items)}):\n" + "\n".join(f"  {item}" for item in items)


_GRAPH = None


def project_graph() -> Graph:
    global _GRAPH
    if _GRAPH is None:
        _GRAPH = build_graph(project_sources())
    return _GRAPH


def test_no_import_cycles():
    graph = project_graph()
    cycles = find_cycles(graph)
    _fail_with("import cycles", [describe_cycle(graph, c) for c in cycles])


def test_no_upward_imports():
    _fail_with("imports that reach up a layer (tests/test_layers.py:LAYERS)", upward_imports(project_graph()))


def test_lazy_imports_say_why():
    _fail_with("function-level imports without a comment saying why (e.g. keeps torch out of import)",
               project_graph().silent_lazy)


def test_every_module_has_a_layer():
    graph = project_graph()
    unclaimed = [f"{path}: {m}" for m, path in sorted(graph.modules.items()) if layer_of(m) is None]
    _fail_with("modules no layer claims (add them to tests/test_layers.py:LAYERS)", unclaimed)
    _fail_with("imports of project modules that do not exist", graph.missing)


def test_checker_on_a_synthetic_graph():
    """The checker finds a cycle through a lazy import, an upward import, a silent lazy import
    and a missing module, and lets a commented lazy import and a downward import pass."""
    def src(path: str, is_package: bool, text: str) -> tuple[str, bool, str]:
        return path, is_package, text

    sources = {
        "fedlora.low": src("fedlora/low.py", False,
                           "import os\n"
                           "from fedlora import high\n"        # upward, and half of a cycle
                           "def f():\n"
                           "    import json\n"                 # stdlib: needs no reason
                           "    from fedlora.mid import g\n"   # silent lazy import (and a cycle)
                           "    return g\n"),
        "fedlora.mid": src("fedlora/mid.py", False,
                           "from .low import f\n"              # relative, downward
                           "def g():\n"
                           "    # keeps torch out of import\n"
                           "    import torch\n"
                           "    from fedlora.high import h\n"  # covered by the comment above the run
                           "    import numpy  # heavy\n"
                           "\n"
                           "    from fedlora.low import f\n"  # same block, after a blank line: covered
                           "    x = 1\n"
                           "    from fedlora.high import h\n"  # after a statement: a new block, silent
                           "    return torch\n"),
        "fedlora.high": src("fedlora/high.py", False,
                            "def h():\n"
                            "    import numpy\n"               # third-party, silent
                            "    from fedlora.gone import x\n"  # no such module; silent too
                            "    return x\n"),
        "fedlora.pkg": src("fedlora/pkg/__init__.py", True, "from . import leaf\n"),
        "fedlora.pkg.leaf": src("fedlora/pkg/leaf.py", False, "from fedlora.pkg import other\n"),
    }
    layers = {1: ("fedlora.low", "fedlora.pkg"), 2: ("fedlora.mid",), 3: ("fedlora.high",)}
    graph = build_graph(sources)

    assert find_cycles(graph) == [["fedlora.low", "fedlora.mid", "fedlora.low"],
                                  ["fedlora.pkg", "fedlora.pkg.leaf", "fedlora.pkg"]]
    assert "fedlora/low.py:5 (in a function): fedlora.low imports fedlora.mid" \
        in describe_cycle(graph, find_cycles(graph)[0])
    assert upward_imports(graph, layers, ()) == [
        "fedlora/low.py:2: fedlora.low (layer 1) imports fedlora.high (layer 3)",
        "fedlora/low.py:5 (in a function): fedlora.low (layer 1) imports fedlora.mid (layer 2)",
        "fedlora/mid.py:5 (in a function): fedlora.mid (layer 2) imports fedlora.high (layer 3)",
        "fedlora/mid.py:10 (in a function): fedlora.mid (layer 2) imports fedlora.high (layer 3)",
    ]
    assert upward_imports(graph, {1: ("fedlora",)}, (("fedlora.low", "fedlora.high"),)) == [
        "fedlora/low.py:2: fedlora.low imports fedlora.high, and these never import each other",
    ]
    assert graph.silent_lazy == ["fedlora/high.py:2: import numpy",
                                 "fedlora/high.py:3: from fedlora.gone import x",
                                 "fedlora/low.py:5: from fedlora.mid import g",
                                 "fedlora/mid.py:10: from fedlora.high import h"]
    assert graph.missing == ["fedlora/high.py:3 imports fedlora.gone, which is no module here"]
    assert layer_of("fedlora.aggregate.sums") == 1 and layer_of("fedlora.aggregate.dp") == 2
    assert layer_of("fedlora.cli") == 6 and layer_of("fedlora.deploy.cli") == 4 and layer_of("elsewhere") is None
