"""detectron2 adapter: our plain ViT as a detectron2 `Backbone`, for ViTDet-style Mask R-CNN.

Thin by design. `ViTBackbone` *is* our `VisionTransformer` (subclass) that also satisfies detectron2's
`Backbone` interface, so wrapped by detectron2's own `SimpleFeaturePyramid` (whose `net` attribute
it becomes) the parameter names are `backbone.net.<our ViT keys>`, exactly as in detectron2's ViTDet:
ViTDet checkpoints, `get_vit_lr_decay_rate` and our checkpoint writer line up without renaming.
The pyramid (deconv / identity / max-pool + LastLevelMaxPool p6) and the heads are detectron2's.

LazyConfig users put `L(ViTBackbone)(...)` in place of detectron2's `ViT` (see configs/coco_mask_rcnn_vit_b.py);
yacs users set `MODEL.BACKBONE.NAME = "build_mae_vit_backbone"` after `add_mae_vit_config(cfg)`.
Layer-wise lr decay needs no registration in detectron2: configs pass the shared rule's functions
(`backbones.lr_decay.lr_decay_factor` / `param_groups`) to the optimizer directly.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, SimpleFeaturePyramid
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import Tensor

from backbones.vit import VisionTransformer, vit_config

logger = logging.getLogger(__name__)

__all__ = ["ViTBackbone", "build_vit_sfp", "build_mae_vit_backbone", "add_mae_vit_config"]


class ViTBackbone(VisionTransformer, Backbone):
    """Our `VisionTransformer` with detectron2's `Backbone` interface: one stride-`patch_size` map.

    Args mirror `VisionTransformer` (`model_name` fills the architecture from `vit_config`, explicit
    keyword arguments override it). `img_size` is the *pretraining* size the absolute position table
    was built for (it is interpolated to the input grid); `rel_pos_input_size` is the detection input
    size the global blocks' rel-pos tables are sized for (ViTDet: 1024). `freeze_blocks=k` freezes the
    patch embedding and blocks 0..k-1 (-1: the whole ViT) with `VisionTransformer.freeze_blocks`.
    """

    def __init__(
        self,
        model_name: str | None = None,
        *,
        out_feature: str = "last_feat",
        freeze_blocks: int = 0,
        img_size: int = 224,
        rel_pos_input_size: int = 1024,
        window_size: int = 14,
        global_block_indexes: Sequence[int] = (),
        use_rel_pos: bool = True,
        drop_path_rate: float = 0.0,
        **vit_kwargs: Any,
    ) -> None:
        arch = vit_config(model_name) if model_name else {}
        # Detection needs no classifier head and no final norm (ViTDet feeds the last block's
        # output to the pyramid); the cls token exists only so pretraining checkpoints load as they are.
        kwargs = dict(num_classes=0, global_pool="", final_norm=False)
        kwargs.update(arch)
        kwargs.update(vit_kwargs)
        super().__init__(
            img_size=img_size,
            rel_pos_input_size=rel_pos_input_size,
            window_size=window_size,
            global_block_indexes=tuple(global_block_indexes),
            use_rel_pos=use_rel_pos,
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
        if self.cls_token is not None:
            # Unused by dense features: keep it out of the optimizer (and DDP's unused-parameter check).
            self.cls_token.requires_grad_(False)
        self.out_feature = out_feature
        self._out_features = [out_feature]
        self._out_feature_channels = {out_feature: self.embed_dim}
        self._out_feature_strides = {out_feature: self.patch_size}
        self.freeze_blocks(freeze_blocks)

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        return {self.out_feature: self.forward_spatial(x)[0]}


def build_vit_sfp(net: ViTBackbone, out_channels: int = 256, norm: str = "LN", square_pad: int = 1024,
                  scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5)) -> SimpleFeaturePyramid:
    """detectron2's own SimpleFeaturePyramid (p2-p5 + p6 max-pool) on top of `net`, as in ViTDet."""
    return SimpleFeaturePyramid(
        net=net,
        in_feature=net.out_feature,
        out_channels=out_channels,
        scale_factors=tuple(scale_factors),
        top_block=LastLevelMaxPool(),
        norm=norm,
        square_pad=square_pad,
    )


def add_mae_vit_config(cfg: CfgNode) -> None:
    """Add `MODEL.MAE_VIT` (defaults: ViTDet-B) to a yacs config, for `build_mae_vit_backbone`."""
    cfg.MODEL.MAE_VIT = CfgNode()
    c = cfg.MODEL.MAE_VIT
    c.NAME = "vit_base_patch16_224"
    c.PRETRAIN_IMG_SIZE = 224
    c.IMG_SIZE = 1024
    c.WINDOW_SIZE = 14
    c.GLOBAL_BLOCK_INDEXES = [2, 5, 8, 11]
    c.USE_REL_POS = True
    c.DROP_PATH_RATE = 0.1
    c.FREEZE_BLOCKS = 0
    c.OUT_CHANNELS = 256
    c.NORM = "LN"
    c.SQUARE_PAD = 1024


@BACKBONE_REGISTRY.register()
def build_mae_vit_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """yacs entry point: `MODEL.BACKBONE.NAME = "build_mae_vit_backbone"` (after `add_mae_vit_config`)."""
    c = cfg.MODEL.MAE_VIT
    net = ViTBackbone(
        c.NAME,
        in_chans=input_shape.channels,
        img_size=c.PRETRAIN_IMG_SIZE,
        rel_pos_input_size=c.IMG_SIZE,
        window_size=c.WINDOW_SIZE,
        global_block_indexes=c.GLOBAL_BLOCK_INDEXES,
        use_rel_pos=c.USE_REL_POS,
        drop_path_rate=c.DROP_PATH_RATE,
        freeze_blocks=c.FREEZE_BLOCKS,
    )
    return build_vit_sfp(net, out_channels=c.OUT_CHANNELS, norm=c.NORM, square_pad=c.SQUARE_PAD)
