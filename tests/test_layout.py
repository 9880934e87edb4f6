"""The source layout's rules (docs/architecture.md), read from the code itself: small files and
functions, Ray and MLflow only in jobs/, the dataset format and durable renames in storage/ only."""
from __future__ import annotations

import ast
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


def test_every_file_is_at_most_400_lines():
    found = [f"{p.relative_to(ROOT)} ({n} lines)" for p in sources(*PACKAGES, "tests")
             if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not found, "split these by job: " + ", ".join(found)


@pytest.mark.parametrize("folder", ["model", "pipeline", "preprocessing", "storage"])
def test_ray_and_mlflow_are_imported_only_in_jobs(folder):
    found = [f"{p.relative_to(ROOT)}: {m}" for p in sources(folder) for m in imported_modules(parsed(p))
             if m.split(".")[0] in ("ray", "mlflow")]
    assert not found


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
