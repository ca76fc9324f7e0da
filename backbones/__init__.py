"""The one plain ViT used everywhere, and thin adapters for detectron2 and MMSegmentation."""
import mae_transfer  # noqa: F401  (applies the dependency-floor compat shims before any framework import)
