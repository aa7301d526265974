"""Networks and model files: S (U-Net), D (discriminator), R (reconstructor), and the Segmenter for inference.

With wsiuda.train, the only package that imports torch.
"""

from wsiuda.models.discriminator import DEFAULT_DISCRIMINATOR_WIDTH, FCDiscriminator, build_discriminator
from wsiuda.models.files import build_network, load_model_file, save_model
from wsiuda.models.meta import FORMAT_VERSION, ModelMeta
from wsiuda.models.normalise import images_to_tensor
from wsiuda.models.segmenter import Segmenter, default_model_path, resolve_device
from wsiuda.models.unet import UNet, build_unet, unet_receptive_field

__all__ = [
    "DEFAULT_DISCRIMINATOR_WIDTH",
    "FORMAT_VERSION",
    "FCDiscriminator",
    "ModelMeta",
    "Segmenter",
    "UNet",
    "build_discriminator",
    "build_network",
    "build_unet",
    "default_model_path",
    "images_to_tensor",
    "load_model_file",
    "resolve_device",
    "save_model",
    "unet_receptive_field",
]
