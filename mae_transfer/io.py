"""Files that matter are written to a temp file in the same folder, then renamed (never half-written); a json
file a user gave is read with one clear error line."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mae_transfer.errors import MaeTransferError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp_path)`, then rename tmp_path to `path`; on any error the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | os.PathLike) -> Any:
    """The parsed content of a json file; a file that is not json (or not UTF-8) is one MaeTransferError line."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MaeTransferError(f"{path}: malformed json ({err})") from None


def check_output_dir(path: str | os.PathLike, what: str = "--output-dir") -> None:
    """One MaeTransferError line, before anything runs, where `path` cannot become an output folder: it (or a
    folder above it) is an existing file."""
    path = Path(path)
    for where in (path, *path.parents):
        if where.exists():
            if not where.is_dir():
                named = "is" if where == path else f"lies under {where}, which is"
                raise MaeTransferError(f"{what} {path}: {named} an existing file; expected a folder")
            return


def checkpoint_named_by(output_dir: str | os.PathLike, marker: str, names_checkpoint: bool = True) -> str | None:
    """The checkpoint a resumed run continues from: the file `output_dir/marker` names (`names_checkpoint`:
    detectron2's and mmengine's `last_checkpoint`) or is; None when the folder holds no marker."""
    path = Path(output_dir) / marker
    if not path.is_file():
        return None
    if not names_checkpoint:
        return str(path)
    # detectron2 writes a name relative to the folder, mmengine an absolute path: join keeps the latter
    return os.path.join(output_dir, path.read_text().strip())
