"""Every workaround for the dependency floor, each applied explicitly where its framework is entered.

The floor (see docs/ENVIRONMENT_NOTES.md): Python 3.10-3.13 (3.11 the reference), torch 2.14.1, detectron2
from the `sal-detectron2` wheel (built for 3.10), MMSegmentation 1.2.2 on `mmcv-lite` 2.1.0 (no compiled ops),
mmengine 0.10.7, timm 1.0.31 with Pillow 13. Importing `mae_transfer` applies nothing; who calls what:

  1. `apply_for_mmseg()` (mmcv._ext stand-in): `backbones/mmseg.py` calls it before `import mmseg`. It is
     defined in `backbones.compat` (backbones/ imports nothing from here); import it from there.
  2. mmengine checkpoint loading: `segmentation.checkpoint.use_safe_mmengine_loading`, by segmentation.train.
  3. detectron2 with or without `detectron2._C`: nothing to apply (`detection.compiled_ops` says which).
  4. `patch_timm_posterize()`: `mae_transfer.classification.train_transform`, where RandAugment is built.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["patch_timm_posterize"]


# 1. mmcv._ext stand-in (`apply_for_mmseg`): in `backbones.compat`, with why and when it can go.


# --------------------------------------------------------------------------------------------------
# 2. mmengine checkpoint loading under torch 2.14: not a patch here. mmengine 0.10.7 calls `torch.load`
# without `weights_only`, so its own Runner checkpoints (message hub, numpy values) no longer load under
# torch >= 2.6. `mae_transfer.segmentation.checkpoint.use_safe_mmengine_loading` registers our safe reader through
# mmengine's own loader registry, called explicitly by mae_transfer/segmentation/train.py; it never unpickles arbitrary
# objects unless the user opts in (--allow-pickle).
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# 3. detectron2 with or without `detectron2._C`: nothing to apply; `mae_transfer.detection.compiled_ops` says which
# (framework code lives in the framework package).
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# 4. timm RandAugment's posterize under Pillow >= 12.
# Why: at high magnitudes timm 1.0.31's 'PosterizeIncreasing' asks to keep 0 bits (4 - 4), which older
# Pillow turned into a black image; Pillow 13 (our lock) raises "bits must be between or equal to 1 and
# 8", killing a fine-tuning data loader at random. We restore the old result (0 bits kept = all zeros)
# in timm's op table, for 0 bits only.
# When it can go: when timm clamps the posterize level to >= 1 bit (or Pillow is pinned below 12).
# --------------------------------------------------------------------------------------------------
def patch_timm_posterize() -> bool:
    """Call before building a timm RandAugment transform. Idempotent; True if it patched just now."""
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
