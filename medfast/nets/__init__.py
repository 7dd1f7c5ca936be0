"""Networks (plain ``nn.Module``s): UNet for segmentation; LocalNet/GlobalNet for registration."""

from medfast.nets.unet import UNet

__all__ = ["UNet"]
