"""detectron2 with or without its compiled ops (`detectron2._C`): which one this interpreter has, for logs
(scripts/setup_env.sh prints it) and tests. Nothing is patched either way (mae_transfer/compat.py, 3.).
"""
from __future__ import annotations

import importlib
import sys

__all__ = ["detectron2_compiled_ops_status", "detectron2_has_compiled_ops"]


# --------------------------------------------------------------------------------------------------
# 3. detectron2 with or without `detectron2._C`.
# Why: the sal-detectron2 wheel's `_C` is compiled for CPython 3.10 (against the torch of its build, late
# 2024); on 3.11-3.13 it cannot load. Mask R-CNN does not need it: ROIAlign and NMS come from torchvision,
# and COCOEvaluator falls back to pycocotools' COCOeval when `_C` is missing, so nothing is patched; deformable
# conv and rotated boxes are unavailable. Where `_C` loads (3.10, if its C++ ABI matches our torch),
# detectron2 uses it by itself: COCOEvaluator's C++ COCOeval_opt, DeformConv, nms_rotated, ROIAlignRotated.
# (detectron2's checkpointer reads files through `mae_transfer.detection.checkpoint.detection_checkpointer`.)
# When it can go: with an official detectron2 wheel for our Python and torch.
# --------------------------------------------------------------------------------------------------
def detectron2_has_compiled_ops() -> bool:
    return _detectron2_compiled_ops_error() is None


def detectron2_compiled_ops_status() -> str:
    """One line for logs (scripts/setup_env.sh prints it): whether detectron2._C loaded, and if not why."""
    error = _detectron2_compiled_ops_error()
    if error is None:
        return "loaded (detectron2 uses its C++ COCOeval, deformable conv and rotated-box ops)"
    if sys.version_info[:2] != (3, 10):
        why = f"the wheel's _C is built for CPython 3.10 only, this is {sys.version_info[0]}.{sys.version_info[1]}"
    else:  # built against the torch (CUDA 12) of late 2024: libcudart.so.12 and older c10 / torch symbols
        torch = importlib.import_module("torch")
        why = f"the wheel's _C does not load with torch {torch.__version__}: {error}"
    return f"not loaded ({why}); using the torchvision / pycocotools fallbacks"


def _detectron2_compiled_ops_error() -> str | None:
    try:
        importlib.import_module("detectron2._C")
    except ImportError as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


