"""The generic training framework: YAML/dataclass configs, the :class:`Trainer` (DDP under torchrun, AMP,
gradient accumulation, atomic checkpoints with exact resume, progress and logs), the :class:`Task`
interface that tasks implement, and sliding-window inference."""

from medfast.train.config import (
    AugmentConfig,
    Config,
    ConfigError,
    DataConfig,
    InferenceConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainerConfig,
    check_config,
    check_spatial_config,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from medfast.train.distributed import EpochSampler
from medfast.train.sliding_window import importance_map, sliding_window_inference
from medfast.train.task import Task, get_task, register_task, task_names
from medfast.train.trainer import (
    CheckpointError,
    NonFiniteLossError,
    Trainer,
    load_checkpoint,
    save_checkpoint,
    train,
)

__all__ = [
    "AugmentConfig",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataConfig",
    "EpochSampler",
    "InferenceConfig",
    "LossConfig",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "Task",
    "Trainer",
    "TrainerConfig",
    "check_config",
    "check_spatial_config",
    "config_from_dict",
    "config_to_dict",
    "get_task",
    "importance_map",
    "load_checkpoint",
    "load_config",
    "register_task",
    "save_checkpoint",
    "save_config",
    "sliding_window_inference",
    "task_names",
    "train",
]
