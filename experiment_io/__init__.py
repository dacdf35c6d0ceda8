"""experiment_io: save and restore PyTorch training experiments, exactly.

The public API is the names in ``__all__``, importable from the package itself.
Everything else lives in internal modules (documented on the architecture page)
whose names may change; :mod:`experiment_io.errors` is public too.
"""

from .version import __version__
from .controllers import Controller, PatienceController, TrainingPosition
from .databases import Database, HDF5Database, NPZDatabase, Restartable
from .errors import ExperimentIOError
from .lock import RunLock
from .metric_tracker import MetricTracker
from .own_loop import AtomicSaver, PendingSave, atomic_save, rank_zero_save, verified_load
from .preemption import DEFAULT_SIGNALS, PREEMPTED_EXIT_CODE
from .retention import Retention
from .routines import SetupParams, setup_and_train, setup_training, test_model
from .sampler import ResumableSampler
from .serialization import load_checkpoint, load_checkpoint_from_cwd, load_model_from_cwd
from .training import train_model
from .training_modules import Evaluator, TrainingModules
from .trust import register_safe_classes

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
