"""nnU-Net v2 model folders run by volseg's inference engine (docs/nnunet.md): the folder read
safely (:mod:`.folder`), nnU-Net's steps replayed (:mod:`.steps`) and the predictor
(:mod:`.predictor`). nnunetv2 itself is not needed."""

from .folder import NnUNetModel, is_nnunet_folder, load_nnunet, nnunet_channels
from .predictor import NnUNetPredictor

__all__ = ["NnUNetModel", "NnUNetPredictor", "is_nnunet_folder", "load_nnunet", "nnunet_channels"]
