"""The house's layers (docs/architecture.md): imports run one way. Walks every import in the source, including those
inside functions, so that neither a circle nor a wrong-way arrow can come back unnoticed."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "engine", "jobs", "serve")
# what each package may import from the others: compress is the library (no Ray, no engine, no jobs, no server); the
# engine generates on compress's models; jobs and serve sit on both (the Batch API's job is a jobs pipeline, so serve
# may run jobs, never the other way)
ALLOWED = {"compress": set(), "engine": {"compress"}, "jobs": {"compress", "engine"},
           "serve": {"compress", "engine", "jobs"}}
NO_RAY_OR_HTTP = {"ray", "fastapi", "starlette", "uvicorn", "openai"}  # never imported by compress or engine
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


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
            if pkg in ("compress", "engine"):
                assert top not in NO_RAY_OR_HTTP, f"{name} imports {target}: {pkg} stays free of Ray and serving"


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


def test_every_file_reads_in_one_sitting_and_every_function_fits_a_screen():
    """Files of at most MAX_FILE_LINES lines, functions of at most MAX_FUNCTION_LINES (their docstring aside: a
    job's main documents every flag there); each module says what it owns in a docstring."""
    _, modules = module_graph()
    for name, path in modules.items():
        source = path.read_text()
        lines = source.count("\n")
        where = path.relative_to(ROOT)
        assert lines <= MAX_FILE_LINES, f"{where} has {lines} lines: split it (at most {MAX_FILE_LINES})"
        tree = ast.parse(source)
        assert ast.get_docstring(tree), f"{where} has no module docstring saying what it owns"
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):  # the docstring
                    length -= first.end_lineno - first.lineno + 1
                assert length <= MAX_FUNCTION_LINES, (f"{name}.{node.name} has {length} lines "
                                                      f"(at most {MAX_FUNCTION_LINES})")
