"""Checkpoint files: how the experiment objects map to the files of a run directory.

================================  =================================================
file                              content
================================  =================================================
``experiment_structure.pt``       pickled objects: training modules, controller,
                                  database descriptor (loaded through the trust gate);
                                  the tensors the state files restore are left out
``last_checkpoint.pt``            every ``state_dict`` (model, loss, evaluator,
                                  controller, metric tracker, RNG, data position)
``best_checkpoint.pt``            the same, at the best epoch
``best_model.pt``                 the model's ``state_dict`` at the best epoch
``checkpoint_epoch_N.pt``         as ``last_checkpoint.pt``, kept for epoch N
``model_epoch_N.pt``              as ``best_model.pt``, kept for epoch N
``experiment_manifest.json``      digest, size and provenance of every file above
================================  =================================================

State files hold plain data and tensors only: each loads with
``torch.load(path, weights_only=True)``.

Payloads are written by :func:`save_payload`: ``torch.save`` without the CRC-32 of
each record, which ``torch.load`` never checks; every file's xxh3 digest, checked
before any load, protects the bytes instead.
"""
import contextlib
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass

import torch

from . import format as fmt
from . import skeleton, storage
from .devices import module_device
from .errors import NotACheckpointError
from .rng import get_rng_state

__all__ = [
    "STRUCTURE_NAME",
    "LAST_NAME",
    "BEST_NAME",
    "BEST_MODEL_NAME",
    "epoch_checkpoint_name",
    "epoch_model_name",
    "TrainingPosition",
    "RunWriter",
    "structure_payload",
    "checkpoint_payload",
    "model_payload",
    "save_payload",
]

log = logging.getLogger(__name__)

#: The pickled objects of a run, written once at its start.
STRUCTURE_NAME = "experiment_structure.pt"
#: Every state of the run after its newest save.
LAST_NAME = "last_checkpoint.pt"
#: Every state of the run at its best epoch.
BEST_NAME = "best_checkpoint.pt"
#: The model's ``state_dict`` at the best epoch.
BEST_MODEL_NAME = "best_model.pt"


_crc_lock = threading.Lock()
_crc_users = 0
_crc_before = True


@contextlib.contextmanager
def _without_crc32():
    """``torch.save`` computes no CRC-32 inside this context (in every thread); the
    setting in force before the outermost entry is restored on the last exit."""
    global _crc_users, _crc_before
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None:  # pragma: no cover - torch without the option always computes it
        yield
        return
    with _crc_lock:
        if _crc_users == 0:
            _crc_before = get()
            torch.serialization.set_crc32_options(False)
        _crc_users += 1
    try:
        yield
    finally:
        with _crc_lock:
            _crc_users -= 1
            if _crc_users == 0:
                torch.serialization.set_crc32_options(_crc_before)


def save_payload(payload, f):
    """Write ``payload`` to the binary file object ``f`` with :func:`torch.save`.

    The zip records get no CRC-32 (``torch.load`` does not check it, and computing
    it costs about as much as writing the bytes to the page cache); files load with
    ``torch.load`` as usual. Python's :mod:`zipfile` reports them as damaged, which
    they are not: the file's digest in the manifest is what proves it intact.
    ``torch.save`` reads the setting when it opens ``f``, and the setting is global:
    a ``torch.save`` that another thread starts while this one runs writes no CRC-32
    either.

    A structure payload is written without the data of the tensors that the state
    files restore (see :mod:`experiment_io.skeleton`).
    """
    options = {}
    if payload.get(fmt.HEADER_KEY, {}).get("kind") == "structure":
        model, loss, _evaluator = payload["training_modules"]
        left_out = skeleton.without_aliases(payload, skeleton.restored_tensors(model, loss))
        options["pickle_module"] = skeleton.pickle_module_without(left_out)
    with _without_crc32():
        torch.save(payload, f, **options)


def epoch_checkpoint_name(epoch):
    """The name of the checkpoint kept for the 0-based ``epoch``."""
    return f"checkpoint_epoch_{epoch}.pt"


def epoch_model_name(epoch):
    """The name of the model state kept for the 0-based ``epoch``."""
    return f"model_epoch_{epoch}.pt"


@dataclass
class TrainingPosition:
    """Where training stands inside the current epoch.

    :ivar epoch: the epoch in progress (equal to the controller's ``current_epoch``).
    :ivar samples_done: training samples of this epoch already trained on.
    :ivar step: optimizer steps taken since the run began.
    :ivar loss_sum: sum of batch loss times batch size over this epoch so far.
    :ivar interrupted: why the checkpoint was written mid-epoch (``None`` at an epoch's end).
    """

    epoch: int = 0
    samples_done: int = 0
    step: int = 0
    loss_sum: float = 0.0
    interrupted: str = None

    def state_dict(self):
        """The position as a plain dict."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state):
        """Build a position from :meth:`state_dict`'s output."""
        return cls(**{k: state[k] for k in ("epoch", "samples_done", "step", "loss_sum", "interrupted")})


def structure_payload(training_modules, controller, database_descriptor):
    """The pickled part of a run: whole objects, loaded back through the trust gate.

    :func:`save_payload` writes the model's and the loss's parameters and persistent
    buffers without their data: the state files hold it.
    """
    return {
        fmt.HEADER_KEY: fmt.make_header("structure"),
        "training_modules": training_modules,
        "controller": controller,
        "database": database_descriptor,
    }


def checkpoint_payload(training_modules, controller, metric_tracker, database, position, structure_digest):
    """Every state of a run as plain data and tensors."""
    model, loss, evaluator = training_modules
    return {
        fmt.HEADER_KEY: fmt.make_header(
            "checkpoint", epochs_done=position.epoch, step=position.step, structure_digest=structure_digest,
            model_device=str(module_device(model)), samples_done=position.samples_done, interrupted=position.interrupted,
        ),
        "model": model.state_dict(),
        "loss": loss.state_dict() if isinstance(loss, torch.nn.Module) else {},
        "evaluator": evaluator.state_dict(),
        "controller": controller.state_dict(),
        "metric_tracker": metric_tracker.state_dict(),
        "rng": get_rng_state(),
        "position": position.state_dict(),
        "database": database.state_dict() if hasattr(database, "state_dict") else None,
    }


def model_payload(model_state, epochs_done, step, structure_digest, model_device):
    """A model's ``state_dict`` with a header."""
    return {
        fmt.HEADER_KEY: fmt.make_header(
            "model", epochs_done=epochs_done, step=step, structure_digest=structure_digest, model_device=str(model_device),
        ),
        "model": model_state,
    }


class RunWriter:
    """Writes the files of one run directory and keeps its manifest.

    Each file goes through :func:`storage.atomic_write`; the manifest is rewritten,
    atomically, after every save, so it lists only files that were completely
    written.

    :param directory: the run directory (created if missing).
    """

    def __init__(self, directory):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        storage.remove_stale_temporaries(self.directory)
        try:
            existing = storage.read_manifest(self.directory)
        except NotACheckpointError as e:
            log.warning("ignoring an unreadable manifest in %s (%s); a new one will be written", self.directory, e)
            existing = None
        self.files = dict(existing[1]) if existing else {}
        self._known_good = set()  # names whose file on disk is the one this writer committed

    def path(self, name):
        """The path of ``name`` in the run directory."""
        return os.path.join(self.directory, name)

    def record(self, name):
        """The manifest record of ``name`` (``None`` when it has none)."""
        return self.files.get(name)

    def has_intact(self, name):
        """Whether ``name`` exists, is readable and matches its manifest record."""
        try:
            return storage.file_matches(self.path(name), self.files.get(name))
        except OSError:
            return False

    def save(self, payloads):
        """Write several payloads, then commit them by writing the manifest.

        :param payloads: ``{file name: payload dict}``; each payload has a header,
            whose plain fields (kind, step, epochs done...) go into the file's record.
        :return: ``{file name: FileRecord}``.
        """
        return self.save_files({
            name: (lambda f, p=payload: save_payload(p, f),
                   {k: v for k, v in payload[fmt.HEADER_KEY].items() if isinstance(v, (int, float, str)) or v is None})
            for name, payload in payloads.items()
        })

    def save_files(self, writes):
        """Write several files, then commit them by writing the manifest.

        Each file's previous generation is kept as ``<name>.prev.pt`` (with its record)
        until the next save, so that a crash at any instant leaves, for every file,
        a generation that verifies.

        :param writes: ``{file name: (write, fields)}``: ``write(f)`` writes the
            file's bytes to ``f``; ``fields`` (plain data) go into its manifest record.
        :return: ``{file name: FileRecord}``.
        """
        snapshot = dict(self.files)
        try:
            records = {name: self._write_generation(name, write, fields) for name, (write, fields) in writes.items()}
            storage._stage("manifest", self.directory)
            storage.write_manifest(self.directory, self.files)
        except BaseException:
            self.files = snapshot  # nothing of this save was committed
            self._known_good.clear()
            raise
        self._known_good.update(writes)
        return records

    def _write_generation(self, name, write, fields):
        previous = storage.previous_name(name)
        committed = self.files.get(name)
        if name in self._known_good or storage.file_matches(self.path(name), committed):
            # the committed file becomes the previous generation
            keep_previous = self.path(previous)
            self.files[previous] = committed
        else:
            # the file at ``name`` is absent, damaged, or an uncommitted leftover of a
            # crashed save: overwrite it, and keep whichever previous generation verifies
            keep_previous = None
            if storage.file_matches(self.path(previous), committed):
                self.files[previous] = committed
            elif not storage.file_matches(self.path(previous), self.files.get(previous)):
                self.files.pop(previous, None)
        if self.files.get(previous) is None:
            self.files.pop(previous, None)
        record = storage.atomic_write(self.path(name), write, keep_previous=keep_previous)
        self.files[name] = {**record.as_dict(), **fields, "written_at": time.time()}
        storage._stage("file_saved", self.path(name))
        return record
