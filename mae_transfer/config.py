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
import os
import runpy
import types
from collections.abc import Iterable
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
