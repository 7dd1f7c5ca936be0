"""Classification: label encoders (nominal, binary, ordinal/CORAL), losses, metrics, class-activation maps,
a folder data set of the user's images and simulated freehand ultrasound rendered on the training device.
Networks live in :mod:`medfast.nets.classification`. See ``docs/classification.md``."""

from medfast.tasks.classification.cam import class_activation_map, save_cam_png
from medfast.tasks.classification.data import ImageFolderDataset, read_image
from medfast.tasks.classification.encoding import BinaryEncoder, NominalEncoder, OrdinalEncoder, make_encoder
from medfast.tasks.classification.losses import ClassificationLoss, coral_loss
from medfast.tasks.classification.metrics import (
    accuracy,
    balanced_accuracy,
    classification_report,
    confusion_matrix,
    precision_recall_f1,
    roc_auc,
    save_confusion_png,
)
from medfast.tasks.classification.simulated import (
    PLANES,
    SimulatedPlaneDataset,
    SimulatedUltrasound,
    load_brain_volume,
)
from medfast.tasks.classification.task import ClassificationTask, build_classifier

__all__ = [
    "PLANES", "BinaryEncoder", "ClassificationLoss", "ClassificationTask", "ImageFolderDataset", "NominalEncoder",
    "OrdinalEncoder", "SimulatedPlaneDataset", "SimulatedUltrasound", "accuracy", "balanced_accuracy",
    "build_classifier", "class_activation_map", "classification_report", "confusion_matrix", "coral_loss",
    "load_brain_volume", "make_encoder", "precision_recall_f1", "read_image", "roc_auc", "save_cam_png",
    "save_confusion_png",
]
