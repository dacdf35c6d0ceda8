"""experiment_io: save and restore PyTorch training experiments, exactly.

The public names are those in ``__all__``; loaders live in
:mod:`experiment_io.serialization`, exceptions in :mod:`experiment_io.errors`.
"""
import logging

from .version import __version__
from .controllers import Controller, PatienceController
from .databases import Database, HDF5Database, NPZDatabase, Restartable
from .metric_tracker import MetricTracker
from .routines import SetupParams, setup_and_train, setup_training, test_model, train_model
from .sampler import ResumableSampler
from .standalone import PendingSave, atomic_save, verified_load
from .training_modules import Evaluator, TrainingModules
from .trust import register_safe_classes

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "TrainingModules",
    "Evaluator",
    "Controller",
    "PatienceController",
    "MetricTracker",
    "Database",
    "NPZDatabase",
    "HDF5Database",
    "Restartable",
    "SetupParams",
    "setup_training",
    "train_model",
    "test_model",
    "setup_and_train",
    "register_safe_classes",
    "atomic_save",
    "verified_load",
    "PendingSave",
    "ResumableSampler",
]
