"""The backbones' user-facing error: one clear line, no traceback needed.

The toolkit's own user error subclasses it, so `except BackboneError` (what the CLIs catch) covers both the
backbones' and the toolkit's user errors, while backbones/ itself knows nothing of the toolkit.
"""
from __future__ import annotations


class BackboneError(Exception):
    """An error the user can fix (unknown model name, bad input size, bad option). Its message is one line."""
