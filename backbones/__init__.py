"""The one plain ViT used everywhere, and thin adapters for detectron2 and MMSegmentation.

Layering: backbones/ imports nothing from mae_transfer/ (mae_transfer builds on it, never the reverse).
Framework adapters (`backbones.detectron2`, `backbones.mmseg`) apply what their framework needs themselves.
"""
