"""The package's shape, read from its source (AST): no import cycle, small modules, each with a docstring.

Imports between package modules are collected wherever they are written, at the
top of a module or inside a function (`import workbench.x`, `from workbench import x`,
`from workbench.x import y`, and relative imports), so a cycle cannot hide in a
function-local import.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "workbench"
MAX_LINES = 450


def modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "workbench" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            base = (node.module or "").split(".")
            if node.level:  # from . import x / from .x import y (inside workbench/)
                base = ["workbench", *[b for b in base if b]]
            if base[0] != "workbench":
                continue
            if len(base) > 1:
                found.add(base[1])
            else:  # from workbench import x, y
                found |= {alias.name for alias in node.names}
    return {m for m in found if m in known} - {path.stem}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported_modules(path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_reader_sees_every_kind_of_import(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text("import workbench.config\nfrom workbench import io, prompt\nfrom workbench.models import x\n"
                   "def f():\n    from workbench.train import train\n    import os\nfrom . import chat\n")
    assert imported_modules(src, {"config", "io", "prompt", "models", "train", "chat"}) == {
        "config", "io", "prompt", "models", "train", "chat"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_package_modules():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_package_module_is_over_450_lines():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_every_module_opens_with_a_docstring():
    missing = [name for name, path in modules().items()
               if path.stat().st_size and not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))]
    assert not missing, f"modules without a docstring: {missing}"


def test_the_loaders_do_not_need_the_trainer():
    """Chat, convert and launch (and what the API server and web chat will build on) never import train."""
    graph = import_graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    for name in ("chat", "convert", "launch", "models", "checkpoint", "distributed", "loss"):
        assert "train" not in reach(name), f"{name} reaches workbench.train"


def test_the_benchmark_patches_nothing():
    """The benchmark gives the trainer its rows and model through Trainer.setup, with no mock.patch."""
    for path in (ROOT / "benchmarks").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "mock" not in text and "monkeypatch" not in text, path.name
