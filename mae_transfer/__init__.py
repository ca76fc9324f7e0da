"""mae-transfer: MAE pretraining of a plain ViT and transfer to detectron2 and MMSegmentation.

Importing the package applies no framework workaround: the places that enter a framework apply what it
needs (see `mae_transfer.compat` and `backbones.compat`).
"""
from mae_transfer.errors import MaeTransferError

__all__ = ["MaeTransferError"]
__version__ = "0.1.0"
