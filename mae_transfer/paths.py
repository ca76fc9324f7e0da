"""The checkout's root, and where relative paths in configs and study specs are looked up.

Configs and study specs name files relative to the repository (`configs/...`, `../shared/data/...`), while
users also pass paths relative to where they run a tool; `resolve_path` accepts both, the current directory first.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str | os.PathLike) -> Path:
    """An absolute path as it is; a relative one from the current directory if it exists there, else from the
    repository root if it exists there, else from the current directory (errors then name the path looked for)."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute():
        return p
    if p.exists() or not (REPO_ROOT / p).exists():
        return p.resolve()
    return (REPO_ROOT / p).resolve()
