"""Every workaround for the dependency floor, in one place, applied once when `mae_transfer` is imported.

The floor (see docs/ENVIRONMENT_NOTES.md): Python 3.11, torch 2.14.1, detectron2 from the
`sal-detectron2` wheel (built for 3.10), MMSegmentation 1.2.2 on `mmcv-lite` 2.1.0 (no compiled ops),
mmengine 0.10.7. Nothing outside this module knows about these patches.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
from typing import Any, Callable

logger = logging.getLogger(__name__)

_APPLIED = False


class CompiledOpUnavailableError(RuntimeError):
    """Raised when code calls an mmcv op that only the full (compiled) mmcv provides."""


# --------------------------------------------------------------------------------------------------
# 1. mmcv._ext stand-in.
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
    """Register a stand-in `mmcv._ext` if mmcv is installed without compiled ops. Returns True if added.

    Called right after `mmcv` itself is first imported (see `apply`), before any `mmcv.ops` import.
    """
    if "mmcv._ext" in sys.modules or "mmcv" not in sys.modules:
        return False
    if importlib.util.find_spec("mmcv._ext") is not None:  # full mmcv: nothing to do
        return False
    module = types.ModuleType("mmcv._ext", "Stand-in for mmcv's compiled ops (installed by mae_transfer.compat).")
    module.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", loader=None)
    module.__getattr__ = _mmcv_ext_getattr  # type: ignore[attr-defined]
    module.MAE_TRANSFER_STAND_IN = True  # type: ignore[attr-defined]
    sys.modules["mmcv._ext"] = module
    sys.modules["mmcv"]._ext = module  # type: ignore[attr-defined]
    return True


# --------------------------------------------------------------------------------------------------
# 2. mmengine checkpoint loading under torch 2.14: not a patch here. mmengine 0.10.7 calls `torch.load`
# without `weights_only`, so its own Runner checkpoints (message hub, numpy values) no longer load under
# torch >= 2.6. `mae_transfer.framework_checkpoints.use_safe_mmengine_loading` registers our safe reader through
# mmengine's own loader registry, called explicitly by tools/train_seg.py; it never unpickles arbitrary
# objects unless the user opts in (--allow-pickle).
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# 3. detectron2 without `detectron2._C`.
# Why: the sal-detectron2 wheel's `_C` is compiled for CPython 3.10 and does not load on 3.11. Mask
# R-CNN does not need it: ROIAlign and NMS come from torchvision, and COCOEvaluator already falls back
# to pycocotools' COCOeval when `_C` is missing, so nothing is patched. Deformable conv and rotated
# boxes stay unavailable. (detectron2's checkpointer reads files through
# `mae_transfer.framework_checkpoints.detection_checkpointer`.)
# When it can go: with an official detectron2 wheel for 3.11.
# --------------------------------------------------------------------------------------------------
def detectron2_has_compiled_ops() -> bool:
    try:
        importlib.import_module("detectron2._C")
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# 4. timm RandAugment's posterize under Pillow >= 12.
# Why: at high magnitudes timm 1.0.31's 'PosterizeIncreasing' asks to keep 0 bits (4 - 4), which older
# Pillow turned into a black image; Pillow 13 (our lock) raises "bits must be between or equal to 1 and
# 8", killing a fine-tuning data loader at random. We restore the old result (0 bits kept = all zeros)
# in timm's op table, for 0 bits only.
# When it can go: when timm clamps the posterize level to >= 1 bit (or Pillow is pinned below 12).
# --------------------------------------------------------------------------------------------------
def patch_timm_posterize() -> bool:
    aa = importlib.import_module("timm.data.auto_augment")
    original = aa.posterize
    if getattr(original, "_mae_transfer_patched", False):
        return False

    def posterize(img: Any, bits_to_keep: int, **kwargs: Any) -> Any:
        if bits_to_keep <= 0:
            return img.point([0] * 256 * len(img.getbands()))  # what Pillow < 12 returned for 0 bits
        return original(img, bits_to_keep, **kwargs)

    posterize._mae_transfer_patched = True  # type: ignore[attr-defined]
    aa.posterize = posterize
    for name, op in list(aa.NAME_TO_OP.items()):
        if op is original:
            aa.NAME_TO_OP[name] = posterize
    return True


def apply() -> None:
    """Apply every workaround once (idempotent). Called by `import mae_transfer`."""
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
    # Each patch runs when its package is first imported, so `import mae_transfer` stays cheap.
    _on_import("mmcv", install_mmcv_ext_stand_in)
    _on_import("timm.data.auto_augment", patch_timm_posterize)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs a callback right after a given module is first imported."""

    def __init__(self, module_name: str, callback: Callable[[], Any]) -> None:
        self.module_name = module_name
        self.callback = callback

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.module_name:
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        real_exec = spec.loader.exec_module
        callback = self.callback

        def exec_module(module: types.ModuleType) -> None:
            real_exec(module)
            callback()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _on_import(module_name: str, callback: Callable[[], Any]) -> None:
    if module_name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _PostImportHook(module_name, callback))
