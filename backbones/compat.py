"""The workaround the MMSegmentation adapter needs before it can import mmseg on the pinned stack.

It lives here, beside the adapter that applies it, because backbones/ knows nothing of the toolkit above it;
the toolkit's compat module lists it with its other workarounds (docs/ENVIRONMENT_NOTES.md).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any


class CompiledOpUnavailableError(RuntimeError):
    """Raised when code calls an mmcv op that only the full (compiled) mmcv provides."""


# --------------------------------------------------------------------------------------------------
# mmcv._ext stand-in.
# Why: `mmseg.utils` imports `mmcv.ops.point_sample` at import time, and every `mmcv.ops` module
# asks `mmcv._ext` for its C++ functions. mmcv-lite ships no `_ext`, and the full mmcv sdist does not
# build against torch 2.14 (needs C++20). The stand-in is a real module whose functions exist (so
# `load_ext`'s hasattr checks pass) but raise a clear error when *called*. UPerHead, FCNHead, the data
# pipeline, IoUMetric and slide inference never call them.
# When it can go: once a full mmcv wheel for torch 2.14 / py3.11 exists (or mmseg stops importing ops).
# --------------------------------------------------------------------------------------------------
def _make_unavailable_op(name: str) -> Callable[..., Any]:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise CompiledOpUnavailableError(
            f"mmcv op '{name}' needs the full compiled mmcv (mmcv._ext); this install uses mmcv-lite, "
            "which has no compiled ops. Use a model without this op (e.g. UPerHead/FCNHead), "
            "or install a full mmcv build matching torch."
        )

    unavailable.__name__ = name
    return unavailable


def _mmcv_ext_getattr(name: str) -> Any:
    # Dunder lookups (__path__, __file__, __wrapped__, ...) must fail normally, or inspect/pickle/
    # doctest machinery that probes modules breaks.
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    return _make_unavailable_op(name)


def install_mmcv_ext_stand_in() -> bool:
    """Register a stand-in `mmcv._ext` if mmcv is imported without compiled ops. Returns True if added."""
    if "mmcv._ext" in sys.modules or "mmcv" not in sys.modules:
        return False
    if importlib.util.find_spec("mmcv._ext") is not None:  # full mmcv: nothing to do
        return False
    module = types.ModuleType("mmcv._ext", "Stand-in for mmcv's compiled ops (installed by backbones.compat).")
    module.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", loader=None)
    module.__getattr__ = _mmcv_ext_getattr  # type: ignore[attr-defined]
    module.MAE_TRANSFER_STAND_IN = True  # type: ignore[attr-defined]
    sys.modules["mmcv._ext"] = module
    sys.modules["mmcv"]._ext = module  # type: ignore[attr-defined]
    return True


def apply_for_mmseg() -> None:
    """Make `import mmseg` work on mmcv-lite: call it before mmseg (or `mmcv.ops`) is first imported.
    Idempotent; imports mmcv itself (cheap, no compiled code) so the stand-in is in place at once."""
    import mmcv  # noqa: F401  (the stand-in hangs off the mmcv package)

    install_mmcv_ext_stand_in()
