"""The package's shape, held by tests: who may import whom, file sizes, and no copied code."""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import lavis_medblip

PACKAGE = Path(lavis_medblip.__file__).parent
CHECKOUT = PACKAGE.parent
#: Where code is written by us and must stay small (tests are exempt).
SOURCE_ROOTS = ("lavis_medblip", "dataset_builders", "benchmarks", "scripts")
MAX_LINES = 400
#: Lines in a row that count as copied code (the library's ``duplicates`` uses 6 too).
COPY_WINDOW = 6
#: Parameter lists repeat by nature (two datasets both take processors and annotation paths).
SIGNATURE_LINE = re.compile(r"def \w+\(|self,|\*,|\w+: [^=]+(=.+)?,|\)( -> .+)?:")


def python_files(*roots: str) -> list[Path]:
    return sorted(path for root in roots for path in (CHECKOUT / root).rglob("*.py"))


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def importers(subpackage: str, forbidden: str) -> list[str]:
    """Files of ``lavis_medblip/<subpackage>`` that import ``forbidden`` or one of its submodules."""
    return [path.relative_to(CHECKOUT).as_posix() for path in python_files(f"lavis_medblip/{subpackage}")
            if any(name == forbidden or name.startswith(forbidden + ".") for name in imports_of(path))]


def test_models_import_neither_datasets_nor_tasks():
    assert importers("models", "lavis_medblip.datasets") == []
    assert importers("models", "lavis_medblip.tasks") == []


def test_processors_import_no_models():
    assert importers("processors", "lavis_medblip.models") == []


def test_the_package_never_imports_dataset_builders():
    """The cohort tools live in the checkout; the demo runs the simulator's CLI instead."""
    assert importers("", "dataset_builders") == []


def test_no_source_file_is_over_400_lines():
    too_long = {path.relative_to(CHECKOUT).as_posix(): length for path in python_files(*SOURCE_ROOTS)
                if (length := len(path.read_text().splitlines())) > MAX_LINES}
    assert too_long == {}


def copied_runs() -> dict[tuple[str, ...], list[str]]:
    """Runs of ``COPY_WINDOW`` identical code lines found in two places (stripped; blank lines, comments,
    imports and parameter lists left out)."""
    places: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for path in python_files(*SOURCE_ROOTS):
        text = path.read_text()
        imports = {number for node in ast.walk(ast.parse(text)) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for number in range(node.lineno, node.end_lineno + 1)}
        code = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)
                if line.strip() and not line.strip().startswith("#") and number not in imports
                and not SIGNATURE_LINE.fullmatch(line.strip())]
        for start in range(len(code) - COPY_WINDOW + 1):
            run = tuple(text for _, text in code[start:start + COPY_WINDOW])
            if sum(len(text) for text in run) > 120:  # a run of brackets and short lines is no copied logic
                places[run].append(f"{path.relative_to(CHECKOUT).as_posix()}:{code[start][0]}")
    return {run: where for run, where in places.items() if len(where) > 1}


def test_no_code_is_copied_between_or_within_files():
    assert [where for where in copied_runs().values()] == []
