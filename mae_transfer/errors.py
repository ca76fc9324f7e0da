"""The project's user-facing error: one clear line, printed by the CLIs without a traceback."""
from __future__ import annotations

from backbones.errors import BackboneError


class MaeTransferError(BackboneError):
    """An error the user can fix (bad file, bad key, bad config). Its message is one line.

    A `BackboneError` (the user error of backbones/, which cannot import this package), so one
    `except BackboneError` catches the user errors of both layers; see `mae_transfer.cli.run_cli`.
    """


class PickledCheckpointError(MaeTransferError):
    """A checkpoint that only the full unpickler reads, refused because the user did not opt in (--allow-pickle)."""
