"""The backbones MAE is compared against today, through the same recipes (issue 35): MAE, DeiT III, DINOv2, CLIP,
BEiTv2 and EVA-02 at ViT-B x COCO Mask R-CNN (ViTDet recipe) / ADE20K UperNet / ImageNet fine-tuning x partial
fine-tuning (12 / 8 / 4 / 0 blocks trained + frozen ViT). GPUs only; README "Backbone families" has the table.

  python tools/study.py --spec configs/studies/backbone_families.py --output-dir work_dirs/studies/families

Weights: `timm:<model>.<tag>` names are read from huggingface_hub's cache (downloaded there where there is
internet: `python -c "import timm; timm.create_model('vit_base_patch14_dinov2.lvd142m', pretrained=True)"`);
offline, each is one `error:` line naming the cache path. A local file in the family's own format works as well
(facebookresearch/dinov2, OpenAI CLIP / open_clip, unilm BEiT, EVA-02, HF CLIPVisionModel / Dinov2Model).
Each backbone's `opts` are its ViT options (backbones/families.py) in each task kind's override spelling; the
patch-14 families (DINOv2, EVA-02) are resampled to 16-px patches for det/seg (FlexiViT pseudo-inverse,
`resample_patch_embed=True`: an approximation, see README) and keep 14 px for classification.
Data and GPUs as configs/studies/coco_ade20k_full.py and imagenet_partial_ft.py.
"""
name = "backbone_families_vit_b"
depth = 12
freeze_blocks = [0, 4, 8, 12, -1]
seeds = [0]
reference = "MAE"


def _opts(patch14: bool = False, **vit) -> dict:
    """A family's ViT options for det (LazyConfig), seg (mmseg --cfg-options) and cls (encoder_overrides)."""
    dense = dict(vit, resample_patch_embed=True) if patch14 else dict(vit)  # 16-px patches in det/seg
    # 14 px where the task allows (as --keep-patch-size); the classifier's grid is the task's img_size (the
    # file's position table is resized to it at load), so no img_size here
    cls = {k: v for k, v in vit.items() if k != "img_size"}
    cls = dict(cls, patch_size=14) if patch14 else cls
    return dict(det=[f"model.backbone.net.{k}={v}" for k, v in dense.items()],
                seg=[f"model.backbone.{k}={v}" for k, v in dense.items()],
                cls=[f"encoder_overrides.{k}={v}" for k, v in cls.items()])


backbones = {
    "MAE": "checkpoints/mae_pretrain_vit_base.pth",
    "DeiT III": dict(checkpoint="timm:deit3_base_patch16_224.fb_in22k_ft_in1k", opts=_opts(init_values=1e-6)),
    "DINOv2": dict(checkpoint="timm:vit_base_patch14_dinov2.lvd142m",
                   opts=_opts(patch14=True, init_values=1e-5, img_size=518)),
    "CLIP": dict(checkpoint="timm:vit_base_patch16_clip_quickgelu_224.openai",
                 opts=_opts(pre_norm=True, norm_eps=1e-5, act_layer="quick_gelu")),
    "BEiTv2": dict(checkpoint="timm:beitv2_base_patch16_224.in1k_ft_in22k_in1k",
                   opts=_opts(init_values=0.1, use_rel_pos_bias=True)),
    "EVA-02": dict(checkpoint="timm:eva02_base_patch14_224.mim_in22k",
                   opts=_opts(patch14=True, mlp_layer="swiglu", scale_mlp=True, mlp_ratio=4 * 2 / 3,
                              use_rot_pos_emb=True, ref_feat_shape=16)),
}
tasks = {
    "coco": dict(kind="det", config="configs/coco_mask_rcnn_vit_b.py", iters=184375, checkpoint_period=5000,
                 args=["--num-gpus", "8"], opts=[]),
    "ade20k": dict(kind="seg", config="configs/ade20k_upernet_vit_b.py", iters=160000, checkpoint_period=16000,
                   launcher=["torchrun", "--nproc_per_node", "8"], args=["--launcher", "pytorch"],
                   opts=["param_scheduler.1.end={iters}"]),
    "imagenet": dict(kind="cls", config="configs/cls_finetune_vit_b.py", epochs=100, checkpoint_period=10,
                     launcher=["torchrun", "--nproc_per_node", "8"], args=["--data", "data/imagenet"],
                     opts=["accum_iter=4"]),
}
