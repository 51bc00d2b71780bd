"""The reference package's layering: no module imports, directly or through others, a module
that imports it back, and the bottom floors (data, model, logprobs, checkpoint, ...) import no
trainer. Imports inside functions count too: a lazy import is still a cycle."""
import ast
import glob
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "reference")
TRAINERS = {"reference.trainer", "reference.sft", "reference.dpo", "reference.grpo"}


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def imports_of(path):
    """The reference modules `path` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from . import x`
    return {m for m in found if m.startswith("reference")}


def graph():
    paths = glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)
    modules = {module_name(p): p for p in paths}
    return {name: {m for m in imports_of(p) if m in modules and m != name}
            for name, p in modules.items()}


def test_no_import_cycle():
    edges = graph()
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if nxt.startswith(node + "."):
                continue  # a package importing its own submodules is not a cycle
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [])


def test_the_bottom_floors_import_no_trainer():
    edges = graph()

    def reach(node, seen):
        for nxt in edges.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                reach(nxt, seen)
        return seen

    for floor in ("reference.data", "reference.model", "reference.logprobs",
                  "reference.checkpoint", "reference.distributed", "reference.runtime",
                  "reference.metrics", "reference.rundir"):
        assert not reach(floor, set()) & TRAINERS, f"{floor} imports a trainer module"


def test_the_graph_is_read():
    """The test above cannot pass by reading nothing: the known edges are there."""
    edges = graph()
    assert "reference.trainer" in edges["reference.sft"]
    assert "reference.logprobs" in edges["reference.dpo"]
