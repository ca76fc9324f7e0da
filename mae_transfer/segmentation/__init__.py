"""UperNet with our plain ViT in MMSegmentation (mmengine Runner): what tools/train_seg.py runs.

Each module is imported by its own path (this package re-exports nothing, so importing it loads no framework):
`train` (the Runner set-up and run), `checks` (everything checked before the Runner starts: config options, data),
`recipe` (the config's numbers as a `mae_transfer.recipe.Recipe`), `resume` (exact resume), `checkpoint` (mmengine's
loader and the backbone's `init_checkpoint` reader, through `mae_transfer.checkpoint`).
"""
__all__ = ["checkpoint", "checks", "recipe", "resume", "train"]
