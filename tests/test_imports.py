"""The project's import graph: a DAG, project modules imported only at module level, no test oracle in the library."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minigmr"
SCRIPTS = [ROOT / "train.py", ROOT / "eval.py", ROOT / "bench.py", ROOT / "pivot.py",
           *sorted((ROOT / "tools").glob("*.py"))]
ORACLES = {"transformers", "peft", "pytrec_eval"}  # the tests' references: the library never imports them


def project_imports(path: pathlib.Path):
    """(module-level imports, function-level imports) of minigmr modules in one file, as module names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top, nested = set(), []

    def names(node):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from . import x (inside the package)
                base = node.module
                return [base] if base else [a.name for a in node.names]
            if node.module == "minigmr":
                return [a.name for a in node.names]
            if node.module and node.module.startswith("minigmr."):
                return [node.module.split(".", 1)[1]]
            return []
        return [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("minigmr.")]

    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            top.update(names(node))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)) and names(inner):
                    nested.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    return {n.split(".")[0] for n in top}, nested


def all_imported_packages(path: pathlib.Path) -> set:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_no_function_level_import_of_project_modules():
    nested = [loc for f in [*PACKAGE.glob("*.py"), *SCRIPTS] if f.exists() for loc in project_imports(f)[1]]
    assert nested == [], f"function-level imports of project modules: {nested}"


def test_package_import_graph_is_a_dag():
    modules = {f.stem: f for f in PACKAGE.glob("*.py")}
    graph = {m: {d for d in project_imports(f)[0] if d in modules and d != m} for m, f in modules.items()}
    for m, f in modules.items():
        unknown = project_imports(f)[0] - set(modules) - {"__init__"}
        assert not unknown, f"{f.name} imports unknown project modules {unknown}"
    state, cycle = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycle.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycle == [], f"import cycles: {cycle}"
    assert "__init__" not in {d for deps in graph.values() for d in deps}


def test_library_never_imports_the_test_oracles():
    offenders = {f.name: all_imported_packages(f) & ORACLES for f in PACKAGE.glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}
