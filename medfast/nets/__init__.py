"""Networks (plain ``nn.Module``s): UNet for segmentation; LocalNet/GlobalNet for registration; SonoNet,
ResNet and DenseNet classifiers."""

from medfast.nets.classification import (
    ClassificationHead,
    CoralHead,
    DenseNetClassifier,
    ResNetClassifier,
    SonoNet,
)
from medfast.nets.registration import GlobalNet, LocalNet
from medfast.nets.unet import UNet

__all__ = ["ClassificationHead", "CoralHead", "DenseNetClassifier", "GlobalNet", "LocalNet", "ResNetClassifier",
           "SonoNet", "UNet"]
