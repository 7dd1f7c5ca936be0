"""Networks (plain ``nn.Module``s): UNet for segmentation; LocalNet/GlobalNet for registration."""

from medfast.nets.classification import ClassificationHead, CoralHead, ResNetClassifier, SonoNet
from medfast.nets.registration import GlobalNet, LocalNet
from medfast.nets.unet import UNet

__all__ = ["ClassificationHead", "CoralHead", "GlobalNet", "LocalNet", "ResNetClassifier", "SonoNet", "UNet"]
