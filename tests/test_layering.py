"""The package's layering, read from its import statements: no module imports from a layer above
its own, and module-level imports form no cycle."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fpn_tf"

# Lower rank = lower layer; a module may import its own layer and those below it.
LAYERS = {
    "file_io": 0,
    "errors": 0,
    "portable_client": 0,  # TensorFlow-free: imports nothing of fpn_tf
    "configs": 1,
    "ops": 2,
    "data": 3,
    "modeling": 4,
    "evaluation": 5,
    "serving": 6,
    "conversion": 7,
    "training": 8,
}
ENTRY_POINTS = 9  # fpn_tf/*.py command-line modules and the package's __init__


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return ENTRY_POINTS
    return LAYERS.get(parts[1], ENTRY_POINTS)


def _imports(path: pathlib.Path, module_level_only: bool):
    """What ``path`` imports from fpn_tf: ``fpn_tf.a.b`` for ``import fpn_tf.a.b`` and for
    ``from fpn_tf.a import b`` (``b`` a module or a name in it)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        yield from (name for name in names if name.split(".")[0] == "fpn_tf")


def _modules():
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for module, path in _modules().items():
        for imported in _imports(path, module_level_only=False):
            if _rank(imported) > _rank(module):
                upward.append(f"{module} imports {imported}")
    assert not upward, "\n".join(upward)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    # The check itself: an ops module importing modeling is reported.
    planted = tmp_path / "bad.py"
    planted.write_text("from fpn_tf.modeling import faster_rcnn\n")
    imported = list(_imports(planted, module_level_only=False))
    assert imported == ["fpn_tf.modeling.faster_rcnn"]
    assert _rank(imported[0]) > _rank("fpn_tf.ops.bad")


def test_module_level_imports_form_no_cycle():
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for imported in _imports(path, module_level_only=True):
            # "from fpn_tf.ops import box_ops" names a module; "from fpn_tf.ops.x import f" too.
            while imported not in modules and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported in modules and imported != module:
                targets.add(imported)
        graph[module] = targets
    # A package's __init__ importing its own modules is the normal re-export, not a cycle.
    for module in graph:
        graph[module] = {t for t in graph[module] if not module.startswith(t + ".")}

    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle.extend(stack[stack.index(nxt) :] + [nxt])
                return True
            if nxt not in state and visit(nxt, stack + [nxt]):
                return True
        state[node] = "done"
        return False

    for start in sorted(graph):
        if start not in state and visit(start, [start]):
            break
    assert not cycle, " -> ".join(cycle)


@pytest.mark.parametrize("module", ["fpn_tf.portable_client"])
def test_portable_client_needs_no_tensorflow(module):
    path = _modules()[module]
    tree = ast.parse(path.read_text())
    top = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not top & {"tensorflow", "keras", "fpn_tf"}, top
