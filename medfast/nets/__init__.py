"""Networks (plain ``nn.Module``s): UNet for segmentation; LocalNet/GlobalNet for registration; SonoNet,
ResNet and DenseNet classifiers; PatchGAN discriminator and U-Net generator for synthesis."""

from medfast.nets._layers import use_torch_layers
from medfast.nets.classification import (
    ClassificationHead,
    CoralHead,
    DenseNetClassifier,
    ResNetClassifier,
    SonoNet,
)
from medfast.nets.gan import ConditionalGAN, PatchDiscriminator, UNetGenerator
from medfast.nets.registration import GlobalNet, LocalNet
from medfast.nets.unet import UNet

__all__ = ["ClassificationHead", "ConditionalGAN", "CoralHead", "DenseNetClassifier", "GlobalNet", "LocalNet",
           "PatchDiscriminator", "ResNetClassifier", "SonoNet", "UNet", "UNetGenerator",
           "use_torch_layers"]
