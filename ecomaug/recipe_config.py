"""A recipe as a team writes it: a name, a file, ``NAME=VALUE`` settings -> one resolved, JSON-ready spec.

Precedence, lowest first: the recipe's defaults (:data:`ecomaug.recipe_defaults.RECIPES`), the recipe file
(``--recipe-config``), then the flags (``--recipe-set NAME=VALUE``, ``--watermark-dir DIR``). The
same resolution serves ``train.py`` and ``ecomaug preview``, so a preview shows what training draws.
The recipe file (YAML or JSON)::

    recipe: ecom                       # optional; must agree with --recipe when both are given
    set:                               # any option of the recipe
      watermark_p: 0.5
      watermark_dir: my_marks          # relative paths are relative to this file
    order: [perspective, flip, colour, mosaic, watermark, grayscale, blur]   # optional; may drop stages
    stages:                            # your own augmentations (see ecomaug.augmentation.custom)
      - name: sharpen
        class: kornia.augmentation:RandomSharpness
        args: {sharpness: 0.5, p: 0.3}
        after: colour                  # or before: NAME; neither: at the end

A setting ``STAGE.ARG=VALUE`` changes one argument of a custom stage.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

# Keys of the recipe's fired statistics that are not stage names (a part of a stage that fires on
# its own), so no custom stage may take them.
FIRED_EXTRA_KEYS = ("recolour",)
from ecomaug.recipe_defaults import DEFAULT_ORDER, RECIPES

_FILE_KEYS = ("recipe", "set", "order", "stages")
_STAGE_KEYS = ("name", "class", "args", "after", "before")
_PATH_OPTIONS = ("watermark_dir",)


@dataclass(frozen=True)
class CustomStage:
    """One ``module:Class`` stage of a recipe file: its name, class, keyword arguments."""

    name: str
    target: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RecipeSpec:
    """A resolved recipe: what :func:`ecomaug.recipes.build_recipe_from_spec` builds and a run records.

    Attributes:
        name: the base recipe (``ecom`` or ``mocov2``).
        options: every option of the base recipe, defaults with the overrides applied (JSON types).
        order: the stages in the order they run, built-in and custom names.
        custom: the custom stages, by name.
    """

    name: str
    options: dict[str, Any]
    order: tuple[str, ...]
    custom: tuple[CustomStage, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data (what ``RUN/config.json`` holds under ``recipe_spec``)."""
        return {"recipe": self.name, "set": dict(self.options), "order": list(self.order),
                "stages": [{"name": s.name, "class": s.target, "args": dict(s.args)} for s in self.custom]}


def parse_settings(pairs: Sequence[str], *, flag: str = "--set") -> dict[str, Any]:
    """``("watermark_p=1.0", "perspective_degrees=(-5, 5)")`` -> ``{"watermark_p": 1.0, ...}``.

    Values are Python literals; anything else (a bare word, a folder path) is kept as a string.
    """
    overrides: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = str(pair).partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{flag} expects NAME=VALUE, got {pair!r}")
        try:
            overrides[name.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            overrides[name.strip()] = text.strip()
    return overrides


def load_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a recipe file (``.yaml``/``.yml`` or ``.json``) and check its keys.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable YAML/JSON, not a mapping, or an unknown key.
    """
    import yaml

    path = Path(path)
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise ValueError(f"cannot read recipe file {path}: {str(error).splitlines()[0]}") from error
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"recipe file {path} must hold a mapping with keys {', '.join(_FILE_KEYS)}")
    unknown = sorted(set(data) - set(_FILE_KEYS))
    if unknown:
        raise ValueError(f"recipe file {path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_FILE_KEYS)}")
    return data


def resolve_recipe(name: str | None = None, *, config_file: str | Path | None = None,
                   settings: Sequence[str] | Mapping[str, Any] = (), watermark_dir: str | Path | None = None,
                   flag: str = "--recipe-set") -> RecipeSpec:
    """Resolve a recipe from its name, a recipe file and settings (flags win over the file).

    Args:
        name: ``ecom`` or ``mocov2``; ``None``: the file's ``recipe``, else ``ecom``.
        config_file: a recipe file (see the module docstring).
        settings: ``NAME=VALUE`` strings (or a mapping of already parsed values).
        watermark_dir: the mark pool folder; the same as the setting ``watermark_dir=DIR``.
        flag: the flag name used in error messages.

    Returns:
        The spec; nothing is imported but the modules of the custom stages it names.

    Raises:
        ValueError: a conflicting name, an unknown option or stage, a bad value or position.
    """
    data = load_recipe_file(config_file) if config_file is not None else {}
    base = Path(config_file).resolve().parent if config_file is not None else Path.cwd()
    file_name = data.get("recipe")
    if name is not None and file_name is not None and name != file_name:
        raise ValueError(f"--recipe {name} and recipe file {config_file} (recipe: {file_name}) disagree; give one")
    name = name or file_name or "ecom"
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; allowed: {', '.join(RECIPES)}")
    file_sets = _mapping(data.get("set"), f"recipe file {config_file}: 'set'")
    flag_sets = dict(settings) if isinstance(settings, Mapping) else parse_settings(settings, flag=flag)
    if watermark_dir is not None:
        flag_sets["watermark_dir"] = str(watermark_dir)
    custom = _custom_stages(data.get("stages") or [], config_file)
    stage_sets = {key: flag_sets.pop(key) for key in list(flag_sets) if "." in key}
    custom = _apply_stage_settings(custom, stage_sets, flag)
    options = {**RECIPES[name]}
    for source, overrides, root in (("recipe file", file_sets, base), (flag, flag_sets, Path.cwd())):
        unknown = sorted(set(overrides) - set(options))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)} for recipe {name!r} (from the {source}); "
                             f"allowed: {', '.join(sorted(options))}")
        for key, value in overrides.items():
            options[key] = str((root / value).resolve()) if key in _PATH_OPTIONS and value is not None else value
    from ecomaug.augmentation.sampling import check_probability  # imports torch: only here

    for key, value in options.items():
        if key.endswith("_p"):
            check_probability(key, value)
    order = _place_stages(list(data.get("order") or DEFAULT_ORDER[name]), DEFAULT_ORDER[name], custom,
                          data.get("stages") or [])
    return RecipeSpec(name, _jsonable(options), tuple(order), tuple(stage for stage, _ in custom))


def spec_from_dict(data: Mapping[str, Any]) -> RecipeSpec:
    """The spec of :meth:`RecipeSpec.to_dict` (e.g. from ``RUN/config.json``), imports nothing."""
    return RecipeSpec(data["recipe"], dict(data["set"]), tuple(data["order"]),
                      tuple(CustomStage(s["name"], s["class"], dict(s.get("args") or {})) for s in data["stages"]))


def recipe_changes(saved: Mapping[str, Any], current: RecipeSpec) -> list[str]:
    """What differs between a run's recorded spec and ``current``, one phrase per difference."""
    now = current.to_dict()
    changes = [f"recipe {saved.get('recipe')} -> {now['recipe']}"] if saved.get("recipe") != now["recipe"] else []
    old_set, new_set = dict(saved.get("set") or {}), now["set"]
    changes += [f"{key}: {old_set.get(key)!r} -> {new_set.get(key)!r}" for key in sorted(set(old_set) | set(new_set))
                if old_set.get(key) != new_set.get(key)]
    if list(saved.get("order") or []) != now["order"]:
        changes.append(f"order {saved.get('order')} -> {now['order']}")
    if list(saved.get("stages") or []) != now["stages"]:
        changes.append("custom stages changed")
    return changes


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping of option names to values, got {type(value).__name__}")
    return dict(value)


def _custom_stages(entries: Any, config_file: Any) -> list[tuple[CustomStage, dict[str, Any]]]:
    from ecomaug.augmentation.custom import import_stage_class

    if not isinstance(entries, list):
        raise ValueError(f"recipe file {config_file}: 'stages' must be a list of stages")
    stages = []
    for entry in entries:
        if not isinstance(entry, dict) or "name" not in entry or "class" not in entry:
            raise ValueError(f"recipe file {config_file}: each stage needs 'name' and 'class' (module:Class), "
                             f"got {entry!r}")
        unknown = sorted(set(entry) - set(_STAGE_KEYS))
        if unknown:
            raise ValueError(f"stage {entry['name']!r}: unknown key(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(_STAGE_KEYS)}")
        import_stage_class(entry["class"])  # fail here, before any work, on a typo
        args = _mapping(entry.get("args"), f"stage {entry['name']!r}: 'args'")
        stages.append((CustomStage(str(entry["name"]), str(entry["class"]), _jsonable(args)), entry))
    return stages


def _apply_stage_settings(custom: list[tuple[CustomStage, dict]], settings: dict[str, Any],
                          flag: str) -> list[tuple[CustomStage, dict]]:
    by_name = {stage.name: index for index, (stage, _) in enumerate(custom)}
    for key, value in settings.items():
        stage_name, _, arg = key.partition(".")
        if stage_name not in by_name or not arg:
            raise ValueError(f"{flag} {key}=...: {stage_name!r} is not a custom stage of the recipe file "
                             f"(custom stages: {', '.join(by_name) or 'none'})")
        stage, entry = custom[by_name[stage_name]]
        custom[by_name[stage_name]] = (CustomStage(stage.name, stage.target, {**stage.args, arg: value}), entry)
    return custom


def _place_stages(order: list[str], built_in: Sequence[str], custom: list[tuple[CustomStage, dict]],
                  entries: Any) -> list[str]:
    names = [stage.name for stage, _ in custom]
    known = set(built_in) | set(names)
    for stage in order:
        if stage not in known:
            raise ValueError(f"unknown stage {stage!r} in 'order'; stages: {', '.join(list(built_in) + names)}")
    reserved = set(built_in) | set(FIRED_EXTRA_KEYS)
    if len(set(order)) != len(order) or len(set(names)) != len(names) or set(names) & reserved:
        raise ValueError(f"stage names must be unique and differ from the built-in ones and the statistics' "
                         f"names ({', '.join(sorted(reserved))})")
    for stage, entry in custom:
        if stage.name in order:
            if "after" in entry or "before" in entry:
                raise ValueError(f"stage {stage.name!r} is placed by 'order'; drop its after/before")
            continue
        if "after" in entry and "before" in entry:
            raise ValueError(f"stage {stage.name!r}: give 'after' or 'before', not both")
        anchor = entry.get("after", entry.get("before"))
        if anchor is None:
            order.append(stage.name)
        elif anchor not in order:
            raise ValueError(f"stage {stage.name!r}: no stage {anchor!r} to put it next to; stages: {', '.join(order)}")
        else:
            order.insert(order.index(anchor) + (1 if "after" in entry else 0), stage.name)
    return order


def _jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, checked to survive JSON (what a run records is what it used)."""
    return json.loads(json.dumps(value, default=_refuse))


def _refuse(value: Any) -> Any:
    raise ValueError(f"recipe values must be numbers, strings, lists or mappings, got {value!r}")


__all__ = ["CustomStage", "RecipeSpec", "load_recipe_file", "parse_settings", "recipe_changes", "resolve_recipe",
           "spec_from_dict"]
