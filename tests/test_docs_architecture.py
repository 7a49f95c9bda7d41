"""docs/architecture.md stays true: the trace names at most five files that exist, with the entry
points it names; every path it mentions exists and every module or name it mentions imports; the
picture is the one docs/draw_architecture.py draws, numbering the same five files."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
PICTURE = REPO / "docs" / "architecture.svg"
TRACE_ENTRY = re.compile(r"^\d+\. \*\*`([^`]+)`\*\* (.+?):", re.MULTILINE)
PATH = re.compile(r"^(?:ecomaug|loaders|bench|tests|scripts|docs)/[\w./-]*$|^train\.py$")
DOTTED = re.compile(r"^(?:ecomaug|loaders|bench)(?:\.[A-Za-z_]\w*)+$")


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def trace() -> list[tuple[str, list[str]]]:
    """The trace's entries: (file, the ``Class.method`` / function names it says the image enters by)."""
    text = doc_text()
    start, end = text.index("<!-- trace"), text.index("<!-- end of trace -->")
    return [(path, re.findall(r"`([\w.]+)`", entries)) for path, entries in TRACE_ENTRY.findall(text[start:end])]


def inline_code() -> set[str]:
    """Every inline code span of the doc, fenced blocks left out."""
    prose = re.sub(r"^```.*?^```", "", doc_text(), flags=re.MULTILINE | re.DOTALL)
    return set(re.findall(r"`([^`\n]+)`", prose))


def defined_names(path: Path) -> set[str]:
    """Top-level functions and classes of a file, and ``Class.method`` for their methods."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{item.name}" for item in node.body
                         if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return names


def test_the_trace_names_at_most_five_files_that_exist_with_their_entry_points():
    entries = trace()
    files = [path for path, _ in entries]
    assert 1 <= len(files) <= 5 and len(set(files)) == len(files), files
    for path, names in entries:
        assert (REPO / path).is_file(), f"the trace names {path}, which does not exist"
        assert names, f"the trace entry of {path} names no function or method"
        missing = set(names) - defined_names(REPO / path)
        assert not missing, f"the trace says the image enters {path} by {sorted(missing)}, which it does not define"


def test_the_trace_runs_loader_recipe_step_objective():
    files = [path for path, _ in trace()]
    assert any(path.startswith("loaders/") and path.endswith("_backend.py") for path in files)
    assert "ecomaug/recipes.py" in files and "ecomaug/engine/step.py" in files
    from ecomaug.objective import ContrastiveOutput

    objectives = [path for path in files
                  if getattr(importlib.import_module(path[:-3].replace("/", ".")), "ContrastiveOutput", None)
                  is ContrastiveOutput and path != "ecomaug/engine/step.py"]
    assert objectives, f"no file of the trace is an objective (returns ecomaug.objective.ContrastiveOutput): {files}"


def test_every_path_the_doc_names_exists():
    paths = sorted(token for token in inline_code() if PATH.match(token))
    assert len(paths) > 40  # the map names the files; an empty match means the pattern broke
    missing = [path for path in paths if not (REPO / path).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def resolve(dotted: str) -> object:
    """Import the longest module prefix of ``dotted`` and look the rest up as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as error:
            if error.name is None or not dotted.startswith(error.name):
                raise
            continue
        for name in parts[cut:]:
            found = getattr(found, name)
        return found
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("dotted", sorted(token for token in inline_code() if DOTTED.match(token)))
def test_every_module_and_name_the_doc_names_imports(dotted):
    resolve(dotted)


def load_drawer():
    spec = importlib.util.spec_from_file_location("draw_architecture", REPO / "docs" / "draw_architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_picture_is_drawn_by_the_script_and_numbers_the_trace():
    drawer = load_drawer()
    svg = PICTURE.read_text(encoding="utf-8")
    assert svg == drawer.draw(), "docs/architecture.svg is stale: run python docs/draw_architecture.py"
    root = ElementTree.fromstring(svg)  # well-formed, so GitHub renders it
    words = " ".join(element.text or "" for element in root.iter() if element.tag.endswith("text"))
    for step in ("images → shards", "shards → pixels", "pixels → views", "views → weights", "weights → matches"):
        assert step in words
    numbered = sorted((kind, name) for spec in drawer.COLUMNS for name, kind in spec["lines"] if kind.isdigit())
    assert [name for _, name in numbered] == [Path(path).name for path, _ in trace()]
    assert "(architecture.svg)" in doc_text()


def test_the_readme_links_the_map():
    assert "](docs/architecture.md)" in (REPO / "README.md").read_text(encoding="utf-8")
