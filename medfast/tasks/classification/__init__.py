"""Classification: label encoders (nominal, binary, ordinal/CORAL), losses, metrics and a folder data set of
the user's images. Networks live in :mod:`medfast.nets.classification`. See ``docs/classification.md``."""

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
from medfast.tasks.classification.task import ClassificationTask, build_classifier

__all__ = [
    "BinaryEncoder", "ClassificationLoss", "ClassificationTask", "ImageFolderDataset", "NominalEncoder",
    "OrdinalEncoder", "accuracy", "balanced_accuracy", "build_classifier", "classification_report",
    "confusion_matrix", "coral_loss", "make_encoder", "precision_recall_f1", "read_image", "roc_auc",
    "save_confusion_png",
]
