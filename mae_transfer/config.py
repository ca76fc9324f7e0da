"""Plain-Python configs: a file of module-level values, plus `key=value` overrides from the command line.

A config file either defines a dict named `config`, or plain module-level variables (names starting
with `_`, modules, functions and classes are ignored). A file may derive from another one with
`_base_ = "other.py"` (path relative to the file): the base is loaded first and this file's values
replace its keys, so tiny CPU configs reuse the real recipe and only change sizes.

Overrides are `key=value` strings; values are parsed as Python literals (`1e-3`, `True`, `(0.9, 0.95)`,
`None`) and fall back to plain strings; dotted keys reach into nested dicts (`encoder_overrides.depth=2`).
A key the config does not define is a user error naming the key and listing the valid ones.
"""
from __future__ import annotations

import ast
import copy
import inspect
import math
import os
import runpy
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mae_transfer.errors import MaeTransferError


def _module_values(namespace: dict[str, Any]) -> dict[str, Any]:
    if isinstance(namespace.get("config"), dict):
        return copy.deepcopy(namespace["config"])
    return {
        key: copy.deepcopy(value)
        for key, value in namespace.items()
        if not key.startswith("_") and not isinstance(value, (types.ModuleType, types.FunctionType, type))
    }


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Load a config file (following `_base_`) and apply `key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise MaeTransferError(f"config file not found: {path}")
    try:
        namespace = runpy.run_path(str(path))
    except MaeTransferError:
        raise
    except Exception as err:  # a broken config is a user error: name the file and the problem
        raise MaeTransferError(f"cannot load config {path}: {type(err).__name__}: {err}") from err
    cfg: dict[str, Any] = {}
    base = namespace.get("_base_")
    if base:
        cfg = load_config(path.parent / base)
    cfg.update(_module_values(namespace))
    return apply_overrides(cfg, overrides)


def parse_value(text: str) -> Any:
    """A Python literal if the text is one (`3`, `1e-3`, `True`, `None`, `[1, 2]`), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `cfg` with `key=value` overrides applied; unknown keys raise `MaeTransferError`."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise MaeTransferError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        *parents, leaf = key.split(".")
        node = cfg
        for i, part in enumerate(parents):
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                valid = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a dict)"
                where = ".".join(parents[:i]) or "config"
                raise MaeTransferError(f"unknown config key {key!r}: {part!r} is not a dict in {where}; "
                                       f"valid keys: {valid}")
            node = child
        # Nested dicts (e.g. encoder_overrides) accept new keys; the top level does not.
        if not parents and leaf not in node:
            raise MaeTransferError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(node))}")
        node[leaf] = parse_value(text)
    return cfg


# ---------------------------------------------------------------------------------------------- value checks
# What a value may be, by name (the words of the error line); a float-valued key takes an integer too.
_KINDS: dict[str, Callable[[Any], bool]] = {
    "True or False": lambda v: isinstance(v, bool),
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "a string": lambda v: isinstance(v, str),
    "a list": lambda v: isinstance(v, (list, tuple)),
    "a list of positive integers": lambda v: isinstance(v, (list, tuple)) and all(
        isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in v),
    "a dict": lambda v: isinstance(v, dict),
    "None": lambda v: v is None,
}


def kind_of(value: Any) -> str | None:
    """The kind a value's replacement must have (None: the value is None, anything may replace it)."""
    if value is None:
        return None
    if isinstance(value, float):
        return "a number"
    return next((name for name, fits in _KINDS.items() if fits(value)), None)


def check_kinds(cfg: dict[str, Any], defaults: dict[str, Any],
                kinds: dict[str, tuple[str, ...]] | None = None) -> None:
    """Every value has the kind of its default (`kinds` names them where the default does not say, e.g. a None
    default that takes a number), so `lr=abc` is one error line naming the key before anything runs, as the
    detectron2 and mmengine overrides are."""
    kinds = kinds or {}
    for key, value in cfg.items():
        expected = kinds.get(key) or ((kind_of(defaults[key]),) if defaults.get(key) is not None else ())
        if expected and not any(_KINDS[kind](value) for kind in expected):
            raise MaeTransferError(f"config key {key!r} must be {' or '.join(expected)}, got {value!r}")


def check_ranges(cfg: dict[str, Any], intervals: dict[str, str]) -> None:
    """Each number-valued key (kind-checked before; None is left alone; each item of a list) lies in its interval,
    written as in mathematics: "[0, 1)", "(0, inf)"; otherwise one error line naming the key and the interval."""
    for key, interval in intervals.items():
        low, high = (float(bound) for bound in interval[1:-1].split(","))
        values = cfg[key] if isinstance(cfg[key], (list, tuple)) else [cfg[key]]
        for value in values:
            if value is None:
                continue
            below = value <= low if interval[0] == "(" else value < low
            above = value >= high if interval[-1] == ")" else value > high
            if below or above:
                raise MaeTransferError(f"config key {key!r} must be in {interval}, got {cfg[key]!r}")


def check_number_pair(cfg: dict[str, Any], key: str) -> None:
    """A key holding two numbers (AdamW betas, a crop scale range): one error line otherwise."""
    value = cfg[key]
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_KINDS["a number"](v) for v in value)):
        raise MaeTransferError(f"config key {key!r} must be two numbers, e.g. (0.9, 0.95), got {value!r}")


def check_keyword_overrides(func: Callable[..., Any], overrides: dict[str, Any], what: str) -> None:
    """A dict of keyword arguments for `func` (e.g. `encoder_overrides` for the ViT): each key one of its
    parameters, each value of the kind of that parameter's default; one error line naming `what` otherwise."""
    params = {name: p.default for name, p in inspect.signature(func).parameters.items()
              if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise MaeTransferError(f"{what}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                               f"{', '.join(sorted(params))}")
    defaults = {name: None if default is inspect.Parameter.empty else default for name, default in params.items()}
    for key, value in overrides.items():
        kind = kind_of(defaults[key])
        if kind and not _KINDS[kind](value):
            raise MaeTransferError(f"config key '{what}.{key}' must be {kind}, got {value!r}")
