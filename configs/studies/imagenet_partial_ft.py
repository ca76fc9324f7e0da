"""The MAE paper's partial fine-tuning curve on ImageNet-1k (He et al., 2021, Fig. 9): MAE ViT-L/16, the last
n of 24 blocks fine-tuned (n = 24, 18, 12, 6, 4, 2, 1, 0 = frozen ViT), with the ViT-L fine-tuning recipe
(configs/cls_finetune_vit_l.py, 50 epochs); random init as the reference line. GPUs only.

  python tools/study.py --spec configs/studies/imagenet_partial_ft.py --output work_dirs/studies/imagenet_pft

Weights: checkpoints/mae_pretrain_vit_large.pth (https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth).
Data: data/imagenet/{train,val}/<wnid>/*.JPEG. 8 GPUs per cell (torchrun); effective batch 1024 = 32 x 4 x 8.
The paper's 0-block point is the linear probe (configs/cls_linprobe_vit_l.py, run separately): here 0 blocks
means the fine-tuning recipe with only fc_norm + head trained.
"""
name = "imagenet_partial_ft_vit_l"
depth = 24
freeze_blocks = [0, 6, 12, 18, 20, 22, 23, -1]
seeds = [0]
reference = "random init"  # results.md: a table of each backbone - random init
backbones = {
    "MAE ViT-L": "checkpoints/mae_pretrain_vit_large.pth",
    "random init": None,
}
tasks = {
    "imagenet": dict(kind="cls", config="configs/cls_finetune_vit_l.py", epochs=50, checkpoint_period=10,
                     launcher=["torchrun", "--nproc_per_node", "8"], args=["--data", "data/imagenet"],
                     opts=["accum_iter=4"]),
}
