"""The project's user-facing error: one clear line, printed by the CLIs without a traceback."""
from __future__ import annotations


class MaeTransferError(Exception):
    """An error the user can fix (bad file, bad key, bad config). Its message is one line."""


class PickledCheckpointError(MaeTransferError):
    """A checkpoint that only the full unpickler reads, refused because the user did not opt in (--allow-pickle)."""
