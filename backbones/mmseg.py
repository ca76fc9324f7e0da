"""MMSegmentation adapter: our `VisionTransformer` registered in mmseg's `MODELS` as `MAEViT`.

Importing this module registers the backbone (a config can do it with
`custom_imports=dict(imports=['backbones.mmseg'], allow_failed_imports=False)`). It also imports
`mae_transfer.optim`, whose mmengine optimizer-wrapper constructor (layer-wise lr decay) the configs use.

The backbone *is* our ViT (a subclass, no wrapper module), so its parameters are named
`backbone.<ViT keys>` inside mmseg's `EncoderDecoder` and converted checkpoints map 1:1. It returns
the stride-16 outputs of the blocks in `out_indices`; mmseg's own `Feature2Pyramid` neck turns them
into the 4-level pyramid (x4 / x2 deconv, identity, max-pool) for UperNet.

Two token layouts, both the same blocks:
  with_cls_token=True  (default): the cls token stays in the sequence, as in BEiT's segmentation code
      that the MAE paper's ADE20K recipe uses, and as in mmseg's `MAE` backbone;
  with_cls_token=False: patch tokens only (`forward_spatial`), as ViTDet / mmseg's `VisionTransformer`
      with `with_cls_token=False`.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from torch import Tensor

import mae_transfer  # noqa: F401  (compat shims before mmseg is imported)
# Importing mae_transfer.optim registers the shared LLRD optimizer-wrapper constructor
# (`MaeLayerDecayOptimizerConstructor`) with mmengine: one implementation for detectron2 and mmseg.
from mae_transfer.optim import freeze_blocks as _freeze_blocks
from backbones.vit import VisionTransformer
from mae_transfer.errors import MaeTransferError
from mmseg.registry import MODELS

logger = logging.getLogger(__name__)


@MODELS.register_module()
class MAEViT(VisionTransformer):
    """Plain ViT backbone for mmseg: returns `len(out_indices)` maps (B, C, H/16, W/16).

    img_size: size of the position table (the pretraining size, 224); other input sizes use a
        bicubic-interpolated table at run time (same interpolation as mmseg's MAE/BEiT resize).
    out_indices: blocks whose outputs are returned, in increasing order (B: 3,5,7,11; L: 7,11,15,23).
    init_checkpoint: any checkpoint format `mae_transfer.checkpoint` imports (our MAE, official MAE,
        timm, HF, mmseg, ...); loaded in `init_weights`, i.e. when the Runner initialises the model, with
        a load report in the log.
    allow_pickle: let `init_checkpoint` hold pickled Python objects (only for files you trust).
    freeze_blocks: freeze the patch embedding, position table and the first k blocks
        (`mae_transfer.optim.freeze_blocks`); -1 freezes the whole backbone.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
        out_indices: Sequence[int] = (3, 5, 7, 11),
        with_cls_token: bool = True,
        init_checkpoint: str | None = None,
        allow_pickle: bool = False,
        freeze_blocks: int = 0,
        grad_checkpointing: bool = False,
    ) -> None:
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)) or not (
            0 <= out_indices[0] and out_indices[-1] < depth
        ):
            raise MaeTransferError(
                f"backbone out_indices must be increasing block indices in [0, {depth - 1}], got {out_indices}"
            )
        # No final norm / pooling / head: UperNet reads block outputs before any final norm (as
        # mmseg's MAE with final_norm=False), and unused parameters would break DDP.
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate,
            num_classes=0, global_pool="", class_token=True, final_norm=False,
            grad_checkpointing=grad_checkpointing,
        )
        self.out_indices = out_indices
        self.with_cls_token = with_cls_token
        self.init_checkpoint = init_checkpoint
        self.allow_pickle = allow_pickle
        self.frozen_blocks = int(freeze_blocks)
        self.init_report: Any = None  # mae_transfer.checkpoint.LoadReport after init_weights
        if not with_cls_token:
            # Kept so checkpoints load 1:1, but unused: no gradient (DDP would flag it as unused).
            self.cls_token.requires_grad_(False)
        if self.frozen_blocks:
            _freeze_blocks(self, self.frozen_blocks)

    # ------------------------------------------------------------------ weights
    def init_weights(self) -> None:
        """Random init (ours), then `init_checkpoint` if given. mmengine's Runner calls this once."""
        super().init_weights()
        path = getattr(self, "init_checkpoint", None)  # unset while VisionTransformer.__init__ runs
        if path:
            self.init_report = load_backbone_checkpoint(self, path, self.allow_pickle)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if not self.with_cls_token:
            return tuple(self.forward_spatial(x, self.out_indices))
        b = x.shape[0]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        outs: list[Tensor] = []

        def keep(_: int, tokens: Tensor) -> None:
            patches = tokens[:, self.num_prefix_tokens:]
            outs.append(patches.transpose(1, 2).reshape(b, -1, h, w).contiguous())

        self.run_blocks(self.embed_tokens(x), self.out_indices, hook=keep)
        return tuple(outs)


def load_backbone_checkpoint(vit: VisionTransformer, path: str, allow_pickle: bool = False) -> Any:
    """Import `path` (any supported format) into `vit` through `mae_transfer.checkpoint`.

    The load report (format, loaded / missing / unexpected keys, resized tables) goes to the
    mmengine log of the run, so every training log says what the backbone started from.
    """
    from mmengine.logging import print_log

    from mae_transfer.checkpoint import load_backbone

    report = load_backbone(vit, path, allow_pickle)
    print_log(f"backbone init_checkpoint load report:\n{report}", logger="current")
    return report
