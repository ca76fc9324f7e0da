"""The mmseg backbone's checkpoint reader: `MAEViT(init_checkpoint=...)` (backbones.mmseg, which knows no
checkpoint formats) reads any format `mae_transfer.checkpoint` imports through the loader this module hands in.

The configs list it next to the adapter, `custom_imports=dict(imports=['backbones.mmseg',
'mae_transfer.mmseg_checkpoint'])`: importing it registers the loader, as importing the adapter registers MAEViT.
Framework glue (imports mmseg through the adapter), not the MAE core.
"""
from __future__ import annotations

import backbones.mmseg
from backbones.vit import VisionTransformer
from mae_transfer.checkpoint import LoadReport, load_backbone


def load_init_checkpoint(source: str, vit: VisionTransformer, allow_pickle: bool = False) -> LoadReport:
    """Import `source` (any supported format) into `vit`; the load report (format, loaded / kept / unused keys,
    resized tables) goes to the mmengine log of the run, so every training log says what the backbone started
    from."""
    from mmengine.logging import print_log

    report = load_backbone(source, vit, allow_pickle)
    print_log(f"backbone init_checkpoint load report:\n{report}", logger="current")
    return report


backbones.mmseg.set_checkpoint_loader(load_init_checkpoint)
