"""The config machinery every command shares: :func:`option` declares a field once (default, help, limits), and
the rest turns fields into flags, reads nested or flat YAML into them and coerces values with errors that name the
option and where it came from."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import field
from typing import Any


def option(default: Any, help: str, **kwargs) -> Any:
    """A config field: its default, its help text and argparse extras (``choices``, ``required``, ``flag``).

    Keeping the flag's description on the field is what lets one builder serve every command. The field's limits
    are declared here too and checked, with every other rule between options, by :mod:`embeddistill.checks`:
    ``minimum`` / ``maximum`` (inclusive), ``above`` (exclusive), applied to each item of a list; ``why`` explains
    a limit in the error. ``shapes=False`` marks a setting that cannot change a run's result (threads, cache
    folder, evaluation depth): ``--resume`` lets it differ from the checkpoint's.
    """
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


def sections(config: Any) -> list[Any]:
    """The config object itself and its nested section dataclasses."""
    nested = [getattr(config, f.name) for f in dataclasses.fields(config)]
    return [config] + [value for value in nested if dataclasses.is_dataclass(value)]


def leaf_fields(config: Any) -> dict[str, tuple[Any, dataclasses.Field]]:
    """``{field_name: (section_object, field)}`` for every non-section field."""
    leaves: dict[str, tuple[Any, dataclasses.Field]] = {}
    for section in sections(config):
        for f in dataclasses.fields(section):
            if dataclasses.is_dataclass(getattr(section, f.name)):
                continue
            if f.name in leaves:
                raise AssertionError(f"config field {f.name!r} is defined twice")
            leaves[f.name] = (section, f)
    return leaves


def flatten(values: dict, source: str = "config", section_names: tuple[str, ...] = ()) -> dict:
    """Flatten ``{section: {option: value}}`` to ``{option: value}``; sections must be among ``section_names``."""
    flat: dict = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ValueError(f"{source}: option names must be strings, got {key!r}")
        if isinstance(value, dict):
            if key not in section_names:
                raise ValueError(f"{source}: unknown section {key!r}; sections are {', '.join(section_names)}")
            flat.update(flatten(value, source, section_names))
        else:
            flat[key.replace("-", "_")] = value
    return flat


def _field_type(section: Any, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(type(section))
    return hints[f.name]


def _coerce(value: Any, annotation: Any, name: str, source: str, special: tuple = ()) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (list, typing.List):  # noqa: UP006
        (item_type,) = typing.get_args(annotation)
        items = value if isinstance(value, list) else [value]
        return [_coerce(item, item_type, name, source) for item in items]
    if origin in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        if isinstance(value, bool) or value in special:
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        expected = " or ".join(["true/false", *map(repr, special)])
        raise ValueError(f"{source}: option {name!r} expects {expected}, got {value!r}")
    expected = " or ".join([annotation.__name__, *map(repr, special)])
    problem = ValueError(f"{source}: option {name!r} expects {expected}, got {value!r}")
    if isinstance(value, str) and value in special:
        return value
    if isinstance(value, bool | list | dict):  # never silently turn true into 1 or a list into its repr
        raise problem
    try:
        coerced = annotation(value)
    except (TypeError, ValueError):
        raise problem from None
    if annotation is int and float(value) != coerced:  # 2.5 epochs is a mistake, not 2
        raise problem
    return coerced


def apply_overrides(config: Any, values: dict, source: str) -> None:
    leaves = leaf_fields(config)
    for name, value in values.items():
        if name not in leaves:
            raise ValueError(f"{source}: unknown option {name!r}; known options: {', '.join(sorted(leaves))}")
        section, f = leaves[name]
        coerced = _coerce(value, _field_type(section, f), name, source, f.metadata.get("special", ()))
        choices = f.metadata.get("choices")
        if choices and coerced not in choices:
            raise ValueError(f"{source}: option {name!r} must be one of {choices}, got {coerced!r}")
        setattr(section, name, coerced)


def _add_argument(group, section: Any, f: dataclasses.Field, value: Any) -> None:
    """One flag for one field; ``default=None`` means 'not given', so YAML values survive unless overridden."""
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    required = bool(f.metadata.get("required"))
    help_text = f.metadata.get("help", "") + ("" if required else f" (default: {value!r})")
    help_text = help_text.replace("%", "%%")  # argparse %-formats help when printing: a bare % would crash --help
    annotation = _field_type(section, f)
    if annotation is bool:
        group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif typing.get_origin(annotation) is list:
        nargs = "+" if required else "*"
        group.add_argument(flag, dest=f.name, nargs=nargs, default=None, required=required, help=help_text)
    else:
        choices = f.metadata.get("choices")
        group.add_argument(flag, dest=f.name, default=None, choices=choices, required=required, help=help_text)


def add_config_arguments(parser: argparse.ArgumentParser, config: Any) -> None:
    """One flag per config field of every section (grouped by section in ``--help``), for any config dataclass."""
    for section in sections(config):
        group = parser.add_argument_group(type(section).__name__.removesuffix("Config").lower() or "general")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if not dataclasses.is_dataclass(value):
                _add_argument(group, section, f, value)


def apply_arguments(config: Any, args: argparse.Namespace) -> Any:
    """Set every field whose flag was given on the command line (coerced and checked like YAML values)."""
    given = {name: getattr(args, name) for name in leaf_fields(config) if getattr(args, name, None) is not None}
    apply_overrides(config, given, source="command line")
    return config
