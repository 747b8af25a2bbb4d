"""The house's layers (docs/architecture.md): imports run one way. Walks every import in the source, including those
inside functions, so that neither a circle nor a wrong-way arrow can come back unnoticed."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "jobs", "serve")
# what each package may import from the others: compress is the library (no Ray, no jobs, no server); jobs and serve
# sit on it, side by side
ALLOWED = {"compress": set(), "jobs": {"compress"}, "serve": {"compress", "jobs"}}
NEVER_IN_COMPRESS = {"ray", "fastapi", "starlette", "uvicorn", "openai"}


def imports_of(file: Path) -> set[str]:
    """Every module a file imports, as dotted names (relative imports are not used in this project)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # "from compress import models"
    return found


def module_graph() -> dict[str, set[str]]:
    modules = {f"{p.parent.name}.{p.stem}": p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")
               if p.stem != "__init__"}
    # a module importing itself (jobs/batch_infer.py does under __main__, so Ray pickles by module name) is no circle
    graph = {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}
    return graph, modules


def test_packages_import_only_the_layers_below_them():
    graph, modules = module_graph()
    for name, path in modules.items():
        pkg = name.split(".")[0]
        for target in imports_of(path):
            top = target.split(".")[0]
            if top in PACKAGES and top != pkg:
                assert top in ALLOWED[pkg], f"{name} imports {target}: {pkg} may import only {ALLOWED[pkg] or 'itself'}"
            if pkg == "compress":
                assert top not in NEVER_IN_COMPRESS, f"{name} imports {target}: the library stays free of Ray/serving"


def test_no_module_imports_itself_through_others():
    graph, _ = module_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
