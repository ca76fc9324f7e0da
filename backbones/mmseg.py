"""MMSegmentation adapter: our `VisionTransformer` registered in mmseg's `MODELS` as `MAEViT`, and the
layer-wise lr decay optimizer-wrapper constructor registered in mmengine as `MaeLayerDecayOptimizerConstructor`.

Importing this module registers both (a config does it with
`custom_imports=dict(imports=['backbones.mmseg', ...], allow_failed_imports=False)`).

backbones/ knows no checkpoint formats: `MAEViT(init_checkpoint=...)` reads the file with the loader handed in
through `set_checkpoint_loader` (the configs' custom_imports list the module that hands in the toolkit's
any-format reader, next to this one).

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
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from backbones import compat
from backbones.errors import BackboneError
from backbones.lr_decay import param_groups
from backbones.vit import VisionTransformer

compat.apply_for_mmseg()  # mmcv-lite has no compiled ops, which `import mmseg` asks for (see backbones.compat)

from mmengine.optim import DefaultOptimWrapperConstructor  # noqa: E402
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402

logger = logging.getLogger(__name__)

# Reads `init_checkpoint` into the backbone: loader(source, vit, allow_pickle) -> its load report (which the
# loader also logs). None until a module hands one in.
CheckpointLoader = Callable[[str, VisionTransformer, bool], Any]
_checkpoint_loader: CheckpointLoader | None = None


def set_checkpoint_loader(loader: CheckpointLoader | None) -> CheckpointLoader | None:
    """Hand in the function `MAEViT.init_weights` reads `init_checkpoint` with; returns the one it replaces."""
    global _checkpoint_loader
    previous, _checkpoint_loader = _checkpoint_loader, loader
    return previous


@MODELS.register_module()
class MAEViT(VisionTransformer):
    """Plain ViT backbone for mmseg: returns `len(out_indices)` maps (B, C, H/16, W/16).

    img_size: size of the position table (and of the relative position bias tables). The ADE20K configs
        use the crop size, 512, as mmseg's `MAE` / BEiT: a 224 checkpoint's table is resized once at
        import and trained at 32x32. Other input sizes use a bicubic-interpolated table at run time.
    use_rel_pos_bias: BEiT relative position bias per block, zero-initialised (mmseg `MAE`).
    init_values: layer scale `gamma_1` / `gamma_2` per block (mmseg `MAE(init_values=1.0)`); None: none.
    out_indices: blocks whose outputs are returned, in increasing order (B: 3,5,7,11; L: 7,11,15,23).
    init_checkpoint: a checkpoint in any format the loader handed in reads (`set_checkpoint_loader`; the
        toolkit's reads our MAE, official MAE, timm, HF, mmseg, ...); loaded in `init_weights`, i.e. when the
        Runner initialises the model, with a load report in the log.
    allow_pickle: let `init_checkpoint` hold pickled Python objects (only for files you trust).
    freeze_blocks: freeze the patch embedding, position table and the first k blocks
        (`VisionTransformer.freeze_blocks`); -1 freezes the whole backbone.
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
        use_rel_pos_bias: bool = False,
        init_values: float | None = None,
        **vit_kwargs: Any,
    ) -> None:
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)) or not (
            0 <= out_indices[0] and out_indices[-1] < depth
        ):
            raise BackboneError(
                f"backbone out_indices must be increasing block indices in [0, {depth - 1}], got {out_indices}"
            )
        # No final norm / pooling / head: UperNet reads block outputs before any final norm (as
        # mmseg's MAE with final_norm=False), and unused parameters would break DDP.
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate,
            num_classes=0, global_pool="", class_token=True, final_norm=False,
            use_rel_pos_bias=use_rel_pos_bias, init_values=init_values, grad_checkpointing=grad_checkpointing,
            **vit_kwargs,  # backbone-family options (reg_tokens, pre_norm, mlp_layer, use_rot_pos_emb, ...)
        )
        self.out_indices = out_indices
        self.with_cls_token = with_cls_token
        self.init_checkpoint = init_checkpoint
        self.allow_pickle = allow_pickle
        self.init_report: Any = None  # the checkpoint loader's report after init_weights
        if not with_cls_token:
            # Kept so checkpoints load 1:1, but unused: no gradient (DDP would flag it as unused).
            self.cls_token.requires_grad_(False)
        self.freeze_blocks(int(freeze_blocks))

    # ------------------------------------------------------------------ weights
    def init_weights(self) -> None:
        """Random init (ours), then `init_checkpoint` if given. mmengine's Runner calls this once."""
        super().init_weights()
        path = getattr(self, "init_checkpoint", None)  # unset while VisionTransformer.__init__ runs
        if path:
            if _checkpoint_loader is None:
                raise BackboneError(
                    f"MAEViT init_checkpoint={path!r}: no checkpoint loader was handed in; list the module that "
                    "provides one in the config's custom_imports, as the configs in configs/ do, or call "
                    "backbones.mmseg.set_checkpoint_loader")
            self.init_report = _checkpoint_loader(path, self, self.allow_pickle)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if not self.with_cls_token:
            return tuple(self.forward_spatial(x, self.out_indices))
        b = x.shape[0]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        outs: list[Tensor] = []

        def keep(_: int, tokens: Tensor) -> None:
            patches = tokens[:, self.num_leading_tokens:]
            outs.append(patches.transpose(1, 2).reshape(b, -1, h, w).contiguous())

        self.run_blocks(self.embed_tokens(x), self.out_indices, hook=keep, hw=(h, w))
        return tuple(outs)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class MaeLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """mmengine optimizer-wrapper constructor whose parameter groups are `backbones.lr_decay.param_groups`
    (`constructor="MaeLayerDecayOptimizerConstructor"` in `optim_wrapper`).

    paramwise_cfg: layer_decay_rate (or decay_rate), num_layers (default: counted from the model),
    backbone_prefix (default 'backbone.'). Base lr and weight decay come from the optimizer config.
    Registered in mmengine's root registry, which mmseg's registry finds through its parent.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None) -> None:
        cfg = dict(paramwise_cfg or {})
        self.layer_decay = float(cfg.pop("layer_decay_rate", cfg.pop("decay_rate", 1.0)))
        self.num_layers = cfg.pop("num_layers", None)
        self.backbone_prefix = cfg.pop("backbone_prefix", "backbone.")
        if cfg:
            raise BackboneError(f"MaeLayerDecayOptimizerConstructor: unknown paramwise_cfg keys {sorted(cfg)}")
        # A non-empty paramwise_cfg makes the base class call add_params (else it takes model.parameters()).
        super().__init__(optim_wrapper_cfg, {"layer_decay_rate": self.layer_decay})

    def add_params(self, params: list[dict], module: nn.Module, **kwargs: Any) -> None:
        params.extend(param_groups(module, self.base_lr, self.base_wd or 0.0, self.layer_decay,
                                   self.num_layers, self.backbone_prefix))
