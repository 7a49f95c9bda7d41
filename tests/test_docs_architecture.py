"""docs/architecture.md stays true: the trace names at most five files that exist, with the entry
points it names, and one profiled training step runs exactly those five and the helpers the doc
names beside them; every path it mentions exists and every module or name it mentions imports; the
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


def helper_files() -> set[str]:
    """The files the doc says the trace's five call on the way (the paragraph after the trace)."""
    text = doc_text()
    start = text.index("<!-- end of trace -->")
    paragraph = text[start:text.index("On a GPU with DALI", start)]
    return {token for token in re.findall(r"`([^`\n]+)`", paragraph) if is_project_code(token)}


def is_project_code(path: str) -> bool:
    """A module of the project's packages (not a test, not an installed library)."""
    return path.split("/")[0] in ("ecomaug", "loaders", "bench") and path.endswith(".py")


def test_one_training_step_runs_the_trace_and_the_helpers_the_doc_names(sample_shards, tmp_path):
    """Profile one step of the default run (torch backend, ecom recipe, MoCo v2), from the loader to the loss."""
    import sys

    from ecomaug.config import parse_config
    from ecomaug.engine.trainer import Trainer

    config = parse_config(["--data", str(sample_shards), "--out", str(tmp_path / "run"), "--preset", "sample",
                           "--model", "test_resnet", "--crop-size", "32", "--batch-size", "8", "--hidden-dim", "32",
                           "--dim", "16", "--num-workers", "0", "--backend", "torch", "--device", "cpu",
                           "--max-steps", "2", "--log-every", "100", "--no-progress"])
    trainer = Trainer(config)
    trainer.setup()
    executed: set[str] = set()
    root = f"{REPO}/"

    def profile(frame, event, _):
        name = frame.f_code.co_filename
        if event == "call" and name.startswith(root) and is_project_code(name[len(root):]):
            executed.add(name[len(root):])

    sys.setprofile(profile)
    try:
        trainer.step(next(iter(trainer.epoch_loader())))
    finally:
        sys.setprofile(None)
        trainer.metrics.close()
    trace_files = {path for path, _ in trace()}
    assert trace_files <= executed, f"trace files one step does not run: {sorted(trace_files - executed)}"
    assert executed - trace_files == helper_files(), (
        f"one step runs {sorted(executed - trace_files - helper_files())} that the doc does not name, and the doc "
        f"names {sorted(helper_files() - executed)} that it does not run")
    match = re.search(r"runs code in (\d+) more project files", doc_text())
    assert match and int(match.group(1)) == len(executed - trace_files)


def test_the_map_names_every_module_of_loaders_and_ecomaug():
    """By its path or its file name; the commands are named as commands (``ecomaug shard``, ...)."""
    named = inline_code()
    modules = [path for package in ("loaders", "ecomaug") for path in sorted((REPO / package).rglob("*.py"))
               if path.name not in ("__init__.py", "__main__.py") and "assets" not in path.parts
               and "commands" not in path.parts]
    missing = [str(path.relative_to(REPO)) for path in modules
               if str(path.relative_to(REPO)) not in named and path.name not in named]
    assert not missing, f"docs/architecture.md does not name {missing}: add each in one phrase"
