"""kubeseg's training engine: nnU-Net v2 training of plans configurations, free of any
pipeline/tracking framework imports.

Main entry: :func:`train_fold`.  See :mod:`kubeseg.training.trainer` for the output layout.
"""
from kubeseg.training.callbacks import CallbackList, TrainingCallback, TrainingCallbackProtocol
from kubeseg.training.schedule import NAMED_SCHEDULES, OptimizerSettings, Schedule, get_schedule
from kubeseg.training.splits import generate_crossval_split, load_or_create_splits, select_fold
from kubeseg.training.trainer import FoldTrainer, TrainSettings, resolve_device, train_fold

__all__ = [
    "train_fold", "TrainSettings", "FoldTrainer", "resolve_device",
    "Schedule", "OptimizerSettings", "NAMED_SCHEDULES", "get_schedule",
    "TrainingCallback", "TrainingCallbackProtocol", "CallbackList",
    "generate_crossval_split", "load_or_create_splits", "select_fold",
]
