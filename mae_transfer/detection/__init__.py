"""Mask R-CNN / Cascade Mask R-CNN with our plain ViT in detectron2: what tools/train_det.py runs.

Each module is imported by its own path (this package re-exports nothing, so importing it loads no framework):
`train` (the trainer, read like detectron2's lazyconfig_train_net.py), `checks` (everything checked before
training: config overrides, datasets, weights), `recipe` (the config's numbers as a `mae_transfer.recipe.Recipe`),
`resume` (exact resume), `data` (dataset registration), `checkpoint` (detectron2's checkpointer and URL checkpoints
read through `mae_transfer.checkpoint`), `pictures` (prediction pictures).
"""
__all__ = ["checkpoint", "checks", "data", "pictures", "recipe", "resume", "train"]
