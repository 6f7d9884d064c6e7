"""The house keeps its shape (docs/architecture.md): no import circles among the project's modules,
the generate walk and the data layer free of the model, no file over 700 lines and no class over 350
lines (tests aside), and the module map of docs/architecture.md naming exactly the modules there are.

The import graph is read from the source with `ast`: imports at module level, inside functions (lazy)
and under `TYPE_CHECKING` all count; only a file's `if __name__ == "__main__":` block does not (it runs
when the file is the script, not when another module imports it: `python dataloader.py` and
`python weights.py` reach their command lines that way). `python tests/test_structure.py` prints the
sizes and the graph.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 700
MAX_CLASS_LINES = 350
NOT_SOURCE = {".venv", "tests", "outputs", "weights", ".git"}


def modules(root: Path = REPO) -> dict[str, Path]:
    """The project's top-level modules (what `import x` finds from the repository root)."""
    return {path.stem: path for path in sorted(root.glob("*.py"))}


def _script_block(node: ast.stmt) -> bool:
    """Whether a top-level statement is `if __name__ == "__main__":`."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def imports_of(path: Path, known: set[str]) -> dict[str, list[int]]:
    """The modules of `known` that the file imports, with the lines that import them."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: dict[str, list[int]] = {}
    for statement in tree.body:
        if _script_block(statement):
            continue
        for node in ast.walk(statement):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in known and top != path.stem:
                    found.setdefault(top, []).append(node.lineno)
    return found


def import_graph(root: Path = REPO) -> dict[str, dict[str, list[int]]]:
    """module -> {imported module: lines} over the top-level modules of `root`."""
    found = modules(root)
    return {name: imports_of(path, set(found)) for name, path in found.items()}


def circles(graph: dict[str, dict]) -> list[list[str]]:
    """The strongly connected groups of more than one module (each holds an import circle), and the
    modules that import themselves; [] when the graph has no circle (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph.get(module, {}):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1 or module in graph.get(module, {}):
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(groups)


def reachable(graph: dict[str, dict], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for other in graph.get(todo.pop(), {}):
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


def source_files(root: Path = REPO) -> list[Path]:
    """Every Python file of the project but the tests (and git-ignored outputs and weights)."""
    return [p for p in sorted(root.rglob("*.py")) if not NOT_SOURCE & set(p.relative_to(root).parts[:1])]


def sizes(root: Path = REPO) -> tuple[list[tuple[int, str]], list[tuple[int, str, int]]]:
    """(lines, file) of every source file and (lines, file:Class, methods) of every class, largest first."""
    files, classes = [], []
    for path in source_files(root):
        text = path.read_text()
        name = str(path.relative_to(root))
        files.append((len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text, filename=name)):
            if isinstance(node, ast.ClassDef):
                methods = sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in node.body)
                classes.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}", methods))
    return sorted(files, reverse=True), sorted(classes, reverse=True)


# ---- the tests ------------------------------------------------------------------------------------

def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 30 and "train_eval" in graph
    found = circles(graph)
    described = "; ".join(" <-> ".join(group) + " (" + ", ".join(
        f"{a} imports {b} at line {graph[a][b][0]}" for a in group for b in group if b in graph[a]) + ")"
        for group in found)
    assert found == [], f"import circles: {described}"


def test_the_circle_check_sees_lazy_imports_and_skips_script_blocks(tmp_path):
    """The check itself: a circle closed by an import inside a function is found, one closed only in
    an `if __name__ == "__main__":` block is not a circle."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    (tmp_path / "c.py").write_text("import d\n")
    (tmp_path / "d.py").write_text("if __name__ == '__main__':\n    import c\n")
    (tmp_path / "e.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n")
    graph = import_graph(tmp_path)
    assert circles(graph) == [["a", "b"]]
    assert graph["e"] == {"a": [3]} and "c" not in graph["d"]


def test_the_generate_walk_and_the_data_layer_import_no_model_code():
    """generate gets its parts handed in (backbone, map_vokens, decoder): generation.py, decoding.py and
    fast_inference.py reach model.py by no import; the data layer reaches no model code at all."""
    graph = import_graph()
    for walk in ("generation", "decoding", "fast_inference", "diffusion"):
        assert "model" not in reachable(graph, walk) | {walk}, f"{walk}.py reaches model.py"
    model_code = {"model", "minigpt4", "lavis", "diffusion", "generation", "fast_inference", "checkpoints"}
    for data in ("dataloader", "dataset_base", "tsv_index", "feature_cache", "collator", "data_problems",
                 "dataset_specs", "prompts", "image_transforms", "shards"):
        assert not reachable(graph, data) & model_code, f"{data}.py reaches {reachable(graph, data) & model_code}"


def test_no_file_over_700_lines_and_no_class_over_350():
    files, classes = sizes()
    assert len(files) > 40
    too_long = [f"{name} ({n} lines)" for n, name in files if n > MAX_FILE_LINES]
    assert not too_long, f"files over {MAX_FILE_LINES} lines: {too_long}; split them by concern"
    too_big = [f"{name} ({n} lines)" for n, name, _ in classes if n > MAX_CLASS_LINES]
    assert not too_big, f"classes over {MAX_CLASS_LINES} lines: {too_big}"


def test_the_module_map_names_every_module():
    """docs/architecture.md's table of rooms lists every top-level module, and only modules that exist."""
    text = (REPO / "docs" / "architecture.md").read_text()
    table = text[text.index("## The rooms"):text.index("## The walk of a training batch")]
    documented = set(re.findall(r"^\| `(\w+)\.py`", table, flags=re.M))
    assert documented == set(modules()), (f"missing from the map: {sorted(set(modules()) - documented)}; "
                                          f"not modules: {sorted(documented - set(modules()))}")


if __name__ == "__main__":
    files, classes = sizes()
    print("largest files:", ", ".join(f"{name} {n}" for n, name in files[:5]))
    print("largest classes:", ", ".join(f"{name} {n} lines / {m} methods" for n, name, m in classes[:5]))
    graph = import_graph()
    print("circles:", circles(graph) or "none")
    for name, imported in sorted(graph.items()):
        print(f"{name} -> {', '.join(sorted(imported)) or '-'}")
