"""The source layout's rules (docs/architecture.md), read from the code itself: short functions, no
import circle, Ray only on jobs/' Ray side and MLflow only on its MLflow side, the head asked about
only by its task, the dataset format and durable renames in storage/ only."""
from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "pipeline", "preprocessing", "storage", "jobs")
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400


def sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported_modules(tree: ast.Module) -> set[str]:
    """Every module an ``import`` or ``from ... import`` names (function-level imports too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def long_functions(tree: ast.Module, limit: int) -> list[tuple[str, int]]:
    return [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]


def test_the_checks_see_what_they_look_for():
    """The helpers themselves: a long function and a nested import are found."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f"def long():\n{body}\n\ndef short():\n    import ray.train\n    from mlflow import x\n")
    assert long_functions(tree, MAX_FUNCTION_LINES) == [("long", MAX_FUNCTION_LINES + 1)]
    assert imported_modules(tree) == {"ray.train", "mlflow"}


def test_every_function_outside_tests_is_at_most_60_lines():
    found = [f"{p.relative_to(ROOT)}:{name} ({n} lines)" for p in sources(*PACKAGES)
             for name, n in long_functions(parsed(p), MAX_FUNCTION_LINES)]
    assert not found, "split these by job: " + ", ".join(found)


def test_long_files_are_named_not_failed():
    """A file over 400 lines is a hint to look for two concepts in it, not a rule: files split by
    concept, never by size (no module re-exports another's names to stay short)."""
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in sources(*PACKAGES, "tests")
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    if long:
        warnings.warn(f"over {MAX_FILE_LINES} lines, does each hold one concept? " + ", ".join(long))
    reexports = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in sources(*PACKAGES) for n in ast.walk(parsed(p))
                 if isinstance(n, ast.ImportFrom) and any("noqa: F401" in line for line in
                                                           p.read_text().splitlines()[n.lineno - 1:n.end_lineno])]
    assert not reexports, "import what you use, from where it is defined: " + ", ".join(reexports)


# Where each of Ray and MLflow may be imported: the jobs/ package of its side, the entry points
# (jobs/<name>.py, thin fronts) and the benchmarks.
SIDES = {"ray": "jobs/cluster", "mlflow": "jobs/tracking"}


def entry_point_or_bench(path: Path) -> bool:
    rel = path.relative_to(ROOT)
    return rel.parts[0] == "jobs" and (len(rel.parts) == 2 or rel.parts[1] == "bench")


@pytest.mark.parametrize("library", sorted(SIDES))
def test_ray_and_mlflow_are_imported_only_on_their_side_of_jobs(library):
    found = [f"{p.relative_to(ROOT)}: {m}" for p in sources(*PACKAGES) for m in imported_modules(parsed(p))
             if m.split(".")[0] == library and not entry_point_or_bench(p)
             and not str(p.relative_to(ROOT)).startswith(SIDES[library])]
    assert not found, f"{library} belongs in {SIDES[library]}/: " + ", ".join(found)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(paths: list[Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in it (function-level imports too; ``from
    pkg import mod`` counts as importing ``pkg.mod`` when that is a module)."""
    known = {module_name(p) for p in paths}
    graph = {}
    for p in paths:
        edges = set()
        for node in ast.walk(parsed(p)):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = {f"{node.module}.{a.name}" for a in node.names} & known
                edges |= subs or ({node.module} & known)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names} & known
        graph[module_name(p)] = edges - {module_name(p)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_circle_finder_finds_circles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_modules():
    found = cycles(import_graph(sources(*PACKAGES)))
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


# Only the task module (one class per head, and its factory task_for) and the model's FC8 builder
# ask which head a net has.
HEAD_OWNERS = ("pipeline/task.py", "model/heads.py")


def head_tests(tree: ast.Module) -> list[int]:
    """Lines that branch on the head: a comparison with ``head``/``x.head``, or a condition that
    reads a task's ``boxes`` (``task.boxes``, ``self.boxes``, ``run.task.boxes``)."""
    def is_head(n):
        return (isinstance(n, ast.Name) and n.id == "head") or (isinstance(n, ast.Attribute) and n.attr == "head")

    def task_boxes(n):
        return (isinstance(n, ast.Attribute) and n.attr == "boxes"
                and ((isinstance(n.value, ast.Name) and n.value.id in ("task", "self"))
                     or (isinstance(n.value, ast.Attribute) and n.value.attr == "task")))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(is_head(x) for x in [node.left, *node.comparators]):
            lines.append(node.lineno)
        elif isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)) and any(
                task_boxes(x) for x in ast.walk(node.test)):
            lines.append(node.lineno)
    return lines


def test_the_head_check_finder_finds_them():
    tree = ast.parse("if cfg.model.head == 'classes':\n    pass\nx = a if task.boxes else b\n"
                     "if head in ('scr', 'pcr'):\n    pass\ny = task.boxes\nif layout.boxes:\n    pass\n")
    assert head_tests(tree) == [1, 3, 4]


def test_only_the_task_asks_which_head_a_net_has():
    found = [f"{p.relative_to(ROOT)}:{line}" for p in sources(*PACKAGES)
             if str(p.relative_to(ROOT)) not in HEAD_OWNERS for line in head_tests(parsed(p))]
    assert not found, "ask the task (pipeline/task.py) instead: " + ", ".join(found)


def test_pipeline_reads_the_dataset_through_storage_only():
    """pipeline/ may use the format module, never preprocessing/'s writer side."""
    found = [f"{p.relative_to(ROOT)}: {m}" for p in sources("pipeline", "model") for m in imported_modules(parsed(p))
             if m.split(".")[0] == "preprocessing"]
    assert not found


def test_storage_imports_no_torch_and_nothing_of_the_project_but_itself():
    found = [f"{p.relative_to(ROOT)}: {m}" for p in sources("storage") for m in imported_modules(parsed(p))
             if m.split(".")[0] in ("torch", "model", "pipeline", "preprocessing", "jobs", "ray", "mlflow")]
    assert not found


def renames(tree: ast.Module) -> list[int]:
    """Lines calling ``os.replace``/``os.rename`` or a ``.replace``/``.rename`` method with one
    argument on a path (``str.replace`` takes two)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if isinstance(f.value, ast.Name) and f.value.id == "os" and f.attr in ("replace", "rename"):
                lines.append(node.lineno)
            elif f.attr in ("replace", "rename") and len(node.args) == 1 and not node.keywords:
                lines.append(node.lineno)
    return lines


def test_files_are_renamed_into_place_only_by_the_storage_layer():
    found = [f"{p.relative_to(ROOT)}:{line}" for p in sources("model", "pipeline", "preprocessing", "jobs")
             for line in renames(parsed(p))]
    assert not found, "write durable files through storage.files: " + ", ".join(found)
    assert renames(parsed(ROOT / "storage" / "files.py")), "the storage layer itself renames"


@pytest.mark.parametrize("folder", ["model", "pipeline", "preprocessing", "storage"])
def test_ray_and_mlflow_are_imported_only_in_jobs(folder):
    found = [f"{p.relative_to(ROOT)}: {m}" for p in sources(folder) for m in imported_modules(parsed(p))
             if m.split(".")[0] in ("ray", "mlflow")]
    assert not found
