"""mae-transfer: MAE pretraining of a plain ViT and transfer to detectron2 and MMSegmentation."""
from mae_transfer import compat as _compat

_compat.apply()

from mae_transfer.errors import MaeTransferError  # noqa: E402

__all__ = ["MaeTransferError"]
__version__ = "0.1.0"
