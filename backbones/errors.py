"""The backbones' user-facing error: one clear line, no traceback needed.

`mae_transfer.errors.MaeTransferError` subclasses it, so `except BackboneError` (what the CLIs catch) covers
both the backbones' and the toolkit's user errors, while backbones/ itself imports nothing from mae_transfer.
"""
from __future__ import annotations


class BackboneError(Exception):
    """An error the user can fix (unknown model name, bad input size, bad option). Its message is one line."""
