"""The modules of ffebm.analog and of the trainer import each other without cycles; device models
import nothing from the pulse machinery; the training loop reaches analog code only through its
plug-in.

The graph is read from the source with ``ast`` (no import is executed): an edge ``a -> b`` for
every import of analog module ``b`` anywhere in ``a`` (module level, inside functions, under
``TYPE_CHECKING``), so an import hidden inside a function to dodge a cycle counts as well.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set

import ffebm.analog
import train

PKG_DIR = Path(ffebm.analog.__file__).resolve().parent
PKG = "ffebm.analog"
INIT = "__init__"

#: cycles that existed before this check and are accepted for now (each a sorted tuple of module
#: names); a new cycle fails the test
ALLOWED_CYCLES: Set[tuple] = set()

#: the pulse machinery: applying pulses to device states
PULSE_MACHINERY = {"integrate", "pulses", "device_array"}


def _targets(node: ast.AST, modules: Set[str], pkg: str = PKG) -> List[str]:
    """Analog modules that one import statement loads (``__init__`` for names taken from the
    package itself)."""
    out: List[str] = []
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name == pkg:
                out.append(INIT)
            elif a.name.startswith(pkg + "."):
                out.append(a.name[len(pkg) + 1:].split(".")[0])
    elif isinstance(node, ast.ImportFrom):
        if node.level == 1:
            base = node.module
        elif node.level == 0 and node.module and (node.module == pkg or node.module.startswith(pkg + ".")):
            base = node.module[len(pkg) + 1:] or None
        else:
            return out  # outside the package
        if base:
            out.append(base.split(".")[0])
        else:  # from . import x / from ffebm.analog import x
            for a in node.names:
                out.append(a.name if a.name in modules else INIT)
    return [t for t in out if t in modules or t == INIT]


def import_graph(pkg_dir: Path = PKG_DIR, pkg: str = PKG) -> Dict[str, Set[str]]:
    """Edges between the modules of one package folder (its own files; subpackages not included)."""
    files = sorted(pkg_dir.glob("*.py"))
    modules = {f.stem for f in files}
    graph: Dict[str, Set[str]] = {}
    for f in files:
        deps: Set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            deps.update(_targets(node, modules, pkg))
        graph[f.stem] = deps
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[tuple]:
    """Strongly connected components with more than one module (or a module importing itself),
    each as a sorted tuple (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[tuple] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def reachable(graph: Dict[str, Set[str]], start: str) -> Set[str]:
    seen: Set[str] = set()
    todo = [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .c import y\n")
    (tmp_path / "c.py").write_text("import ffebm.analog.a\n")
    (tmp_path / "d.py").write_text("from . import a\nfrom ffebm.analog import something\n")
    g = import_graph(tmp_path)
    assert g["b"] == {"c"} and g["c"] == {"a"} and g["d"] == {"a", INIT}
    assert find_cycles(g) == [("a", "b", "c")]


def test_graph_is_read():
    g = import_graph()
    # edges known to exist (a parser that reads nothing would pass the tests below)
    assert {"devices", "integrate", "rng"} <= g["pulses"]
    assert {"devices", "integrate", "pulses", "rng"} <= g["device_array"]
    assert "rng" in g["devices"]


def test_no_import_cycle_in_analog():
    cycles = find_cycles(import_graph())
    new = [c for c in cycles if c not in ALLOWED_CYCLES]
    assert not new, f"import cycles among the modules of ffebm.analog: {new}"


def test_device_models_import_nothing_from_the_pulse_machinery():
    g = import_graph()
    for leaf in ("devices", "rng"):
        hit = reachable(g, leaf) & (PULSE_MACHINERY | {INIT})
        assert not hit, f"{leaf} reaches {sorted(hit)}"
    assert not g["rng"], g["rng"]


TRAIN_DIR = Path(train.__file__).resolve().parent


def test_train_graph_is_read():
    g = import_graph(TRAIN_DIR, "train")
    assert {"state", "metrics", "failures", "analog", "build", "batches", "data"} <= g["trainer"]
    assert "plugin" in g["analog"]


def test_no_import_cycle_in_train():
    g = import_graph(TRAIN_DIR, "train")
    g.pop(INIT, None)   # the package's lazy train() wrapper imports the loop when called
    assert not find_cycles(g), find_cycles(g)


def test_the_loop_knows_nothing_analog_but_its_plugin():
    text = (TRAIN_DIR / "trainer.py").read_text()
    assert "ffebm.analog" not in text and "AnalogOptimizer" not in text and "analog_ctx" not in text
