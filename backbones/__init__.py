"""The one plain ViT used everywhere, and thin adapters for detectron2 and MMSegmentation.

Layering: backbones/ knows nothing of the toolkit package that builds on it (never the reverse); what an adapter
needs from above (the mmseg backbone's checkpoint reader) is handed in.
Framework adapters (`backbones.detectron2`, `backbones.mmseg`) apply what their framework needs themselves.
"""
