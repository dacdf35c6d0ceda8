"""The exceptions of experiment_io.

Every error the library raises on purpose derives from :class:`ExperimentIOError`
and also from the built-in exception that fits it, so existing ``except
FileNotFoundError`` or ``except ValueError`` clauses keep working. Each message says
what went wrong, which file it concerns and how to fix it.
"""
import pickle

__all__ = [
    "ExperimentIOError",
    "CheckpointNotFoundError",
    "NotACheckpointError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "IncompatibleCheckpointError",
    "UnsafeCheckpointError",
    "StructureClassError",
    "DatabaseRestartError",
    "MissingDatabaseError",
    "DeviceError",
    "CheckpointWriteError",
    "RunLockedError",
    "StagedStateModifiedError",
    "RankFailedError",
    "RunExistsError",
    "SetupError",
    "UnknownNameError",
    "DataFileNotFoundError",
]


class ExperimentIOError(Exception):
    """Base class of every error raised by experiment_io.

    Catch this to handle any failure of the library in one place.
    """


class CheckpointNotFoundError(ExperimentIOError, FileNotFoundError):
    """A checkpoint file or run directory that was asked for does not exist.

    Raised for a wrong path, or for a directory that holds no checkpoint of this
    library. The message names the path and the files that were looked for.
    """


class NotACheckpointError(ExperimentIOError, ValueError):
    """A file exists but is not a checkpoint written by experiment_io.

    Raised for text files, plain ``torch.save`` files of other objects, and files
    too damaged to be recognised. The message names the file.
    """


class CorruptCheckpointError(ExperimentIOError, ValueError):
    """A checkpoint file does not match the digest recorded when it was written.

    The file was truncated or changed after it was saved. The message names the file
    and gives the expected and the actual digest and size. Nothing of the file was
    unpickled.
    """


class FormatVersionError(ExperimentIOError, ValueError):
    """A checkpoint was written by a newer on-disk format than this library reads.

    Upgrade experiment_io to load it; the message names the file and both versions.
    """


class IncompatibleCheckpointError(ExperimentIOError, ValueError):
    """The parts that a load combines do not belong together.

    Raised when a state file lacks an entry the structure needs, when a state file
    was written for another structure file, or when a database given for a restart is
    not the one the run was trained on.
    """


class UnsafeCheckpointError(ExperimentIOError, pickle.UnpicklingError):
    """A structure file refers to globals that the trust gate does not admit.

    Loading it would let the file construct objects, or call functions, that were
    not allowed. The message names every offending global and the two ways out:
    ``allow=[...]`` for the names you trust, or ``trusted=True`` for a file you
    wrote yourself.
    """


class StructureClassError(ExperimentIOError, ImportError):
    """A class named in a structure file can no longer be found.

    The class was moved or renamed since the file was saved, or its module is not
    installed. The message names the class and the file.
    """


class DatabaseRestartError(ExperimentIOError, RuntimeError):
    """The database descriptor stored with a run could not be turned back into a database.

    Its class no longer imports, or its data file moved. The message names both the
    class and the file, and how to pass a database yourself instead.
    """


class MissingDatabaseError(ExperimentIOError, ValueError):
    """A restart needs a database that the checkpoint cannot rebuild.

    In-memory databases are not restartable: pass ``database=`` to the load
    function.
    """


class DeviceError(ExperimentIOError, ValueError):
    """A device request cannot be met.

    Raised for an unknown or unavailable device, and for ``map_location`` and
    ``model_device`` given together.
    """


class CheckpointWriteError(ExperimentIOError, OSError):
    """Writing a checkpoint failed (disk full, I/O error, permissions).

    The temporary file was removed and the previous checkpoint is intact.
    """


class RunLockedError(ExperimentIOError, BlockingIOError):
    """Another live process is writing the same run directory.

    Typically a requeued job started while the old one is still dying. The message
    names the holder's pid and host. A lock left by a dead process is taken over
    automatically.
    """


class StagedStateModifiedError(ExperimentIOError, RuntimeError):
    """State was changed in place while an asynchronous save was still copying it.

    With ``async_save=True`` the parameters and optimizer state are copied in the
    background until the next optimizer step, and only the optimizer step may change
    them. The checkpoint of that save is not written (the previous one is intact);
    use ``async_save="copy"`` for a model that changes them elsewhere.
    """


class RankFailedError(ExperimentIOError, RuntimeError):
    """In a data-parallel run, global rank 0 failed at a step every rank takes together.

    Raised on the other ranks so that they stop instead of waiting for rank 0 in a
    collective; the message gives rank 0's error (rank 0 raises the error itself).
    """


class RunExistsError(ExperimentIOError, FileExistsError):
    """A new run was started in a directory that holds another run's checkpoints.

    Starting afresh would replace that run, its best model included. The message
    says what the directory holds (epochs done, best epoch, finished or not) and the
    ways on: resume it, pass ``overwrite=True`` to replace it, or train in another
    directory.
    """


class SetupError(ExperimentIOError, ValueError):
    """The experiment as given cannot be set up or saved.

    Raised for a wrong argument (an unknown optimizer name, a device the machine
    lacks), a data set that is not in the data file, or an object of the experiment
    that cannot be stored (a lambda or a local function). The message names the
    argument or attribute and the fix.
    """


class UnknownNameError(SetupError, KeyError):
    """A :class:`SetupError` for a name that is not there (a data set of a data file, a metric); also a
    :class:`KeyError`. The message names what is there."""

    __str__ = Exception.__str__


class DataFileNotFoundError(SetupError, FileNotFoundError):
    """A data file given to a database does not exist; also a :class:`FileNotFoundError`.

    The message names the path as given and as resolved, and the files of a similar
    name in that directory.
    """

    __str__ = Exception.__str__
