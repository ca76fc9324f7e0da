"""Tiny CPU variant of the MAE recipe: same keys and code path as mae_pretrain_vit_b.py, small sizes.

A 4-block ViT-Tiny (192 wide) at 96 px (6x6 patches, 9 visible), a 2 x 128 decoder, batch 16: a few
seconds per epoch on 2 CPU cores for ~50-100 photos. Tiny runs use an absolute lr (blr would give
~1e-5 at batch 16) and a short warmup.
Run: python tools/pretrain.py --config configs/mae_pretrain_vit_tiny_cpu.py \
         --data ../shared/data/coco_tiny/train2017 --output-dir /tmp/mae_tiny
"""
_base_ = "mae_pretrain_vit_b.py"

encoder = "vit_tiny_patch16_224"
encoder_overrides = {"depth": 4}
img_size = 96
decoder_embed_dim = 128
decoder_depth = 2
decoder_num_heads = 4

batch_size = 16
num_workers = 0
epochs = 40
warmup_epochs = 4
lr = 1.0e-3
amp = "none"  # fp32: the CI hosts vary, and on CPUs without bf16 units (AMX / AVX512-BF16) autocast is slower
compile = False  # on this CPU compiling costs ~1-2 min and gives no measurable speed-up (benchmarks/README.md)
device = "cpu"
save_every = 10
progress = False
