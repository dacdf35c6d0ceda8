"""experiment_io: save and restore PyTorch training experiments, exactly.

The public API is the names in ``__all__``, importable from the package itself.
Everything else lives in internal modules (documented on the architecture page)
whose names may change; :mod:`experiment_io.errors` is public too.
"""

from experiment_io.version import __version__
from experiment_io.experiment.controllers import Controller, PatienceController, TrainingPosition
from experiment_io.experiment.databases import Database
from experiment_io.experiment.restartable import HDF5Database, NPZDatabase, Restartable
from experiment_io.errors import ExperimentIOError
from experiment_io.storage.lock import RunLock
from experiment_io.experiment.metric_tracker import MetricTracker
from experiment_io.frontends.own_loop import AtomicSaver, PendingSave, atomic_save, rank_zero_save
from experiment_io.frontends.verified_loading import verified_load
from experiment_io.training.preemption import DEFAULT_SIGNALS, PREEMPTED_EXIT_CODE
from experiment_io.training.retention import Retention
from experiment_io.training.routines import SetupParams, setup_and_train, setup_training, test_model
from experiment_io.experiment.sampler import ResumableSampler
from experiment_io.loading.loaders import load_checkpoint, load_checkpoint_from_cwd, load_model_from_cwd
from experiment_io.training.loop import train_model
from experiment_io.experiment.training_modules import Evaluator, TrainingModules
from experiment_io.run.trust import register_safe_classes

# No NullHandler: with no logging configured, Python prints WARNING and above to
# stderr (logging.lastResort), so a fallback to an older checkpoint, a signal or a
# superseded run is never invisible; configure logging to route or silence it.

__all__ = [
    "__version__",
    # the experiment
    "TrainingModules",
    "Evaluator",
    "Controller",
    "PatienceController",
    "TrainingPosition",
    "MetricTracker",
    "Database",
    "NPZDatabase",
    "HDF5Database",
    "Restartable",
    # training
    "SetupParams",
    "setup_training",
    "train_model",
    "test_model",
    "setup_and_train",
    "PREEMPTED_EXIT_CODE",
    "DEFAULT_SIGNALS",
    "Retention",
    # loading
    "load_checkpoint",
    "load_checkpoint_from_cwd",
    "load_model_from_cwd",
    "register_safe_classes",
    # your own training loop
    "atomic_save",
    "rank_zero_save",
    "verified_load",
    "AtomicSaver",
    "PendingSave",
    "ResumableSampler",
    "RunLock",
    # errors (every class is in experiment_io.errors)
    "ExperimentIOError",
]
