"""The files of a lineage checkpoint: their names, the record format version, reading and writing them.

Checkpoint ``id`` of a model is the directory ``<root>/<model id>/<id>/``, a run
directory of the library's storage (:class:`~experiment_io.storage.run_directory.RunDirectory`):
every file is written by its writer (a temporary name, fsync, rename, then the
manifest that commits the save) and read with :func:`~experiment_io.verified_load`
(verified, then ``weights_only``).

The lineage's own files, its *records* (``block.pt``, ``state.pt``,
``progress.pt``, ``backup.pt``, ``cache_<name>.pt``), are dicts of plain data and
tensors. Each carries the version of their layout, :data:`RECORD_VERSION`, under
:data:`VERSION_KEY`, and so does its manifest record. A reader accepts every version
up to its own (a record without the key was written before the version was
recorded, and is version 1) and refuses a newer one with an
:class:`~experiment_io.errors.IncompatibleCheckpointError` that says to upgrade.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from experiment_io.errors import CheckpointWriteError, IncompatibleCheckpointError, SetupError
from experiment_io.format import codec as fmt
from experiment_io.frontends.own_loop import USER_KIND
from experiment_io.frontends.verified_loading import verified_load
from experiment_io.platform import archive
from experiment_io.run.payloads import save_payload
from experiment_io.storage import atomic as storage
from experiment_io.storage.lock import RunLock
from experiment_io.storage.manifest import read_manifest
from experiment_io.storage.run_directory import RunDirectory
from experiment_io.version import __version__

__all__ = ["BLOCK_NAME", "STATE_NAME", "PROGRESS_NAME", "BACKUP_NAME", "CACHE_PREFIX", "RECORD_VERSION", "VERSION_KEY",
           "Records", "is_id", "check_id", "cache_file", "is_cache_file", "cached_names", "record_write",
           "payload_write", "checked", "read_record", "check_pair", "remove_tree", "sweep_deletions"]

log = logging.getLogger(__name__)

BLOCK_NAME = "block.pt"
STATE_NAME = "state.pt"
PROGRESS_NAME = "progress.pt"
BACKUP_NAME = "backup.pt"
CACHE_PREFIX = "cache_"

#: Version of the layout of the lineage's records. Raise it whenever a record changes
#: shape; readers refuse versions newer than their own and read every older one.
#:
#: 1. First version. Records written before the version was recorded carry none and
#:    are read as version 1 (their layout is the same).
RECORD_VERSION = 1

#: The key of the version in a record, and the field that holds it in the record's manifest entry.
VERSION_KEY = "lineage_format_version"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

#: A file's write and the fields of its manifest record, as :meth:`Records.save` takes them.
Write = tuple[Callable[[Any], Any], dict]


def is_id(text: str) -> bool:
    """Whether ``text`` is letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit (100 at most)."""
    return _ID.fullmatch(text) is not None


def check_id(value: Any, what: str) -> str:
    """``value`` (an int or a string) as an id of a model, a checkpoint or a cached result.

    :raises SetupError: for anything but letters, digits, ``.``, ``_`` and ``-`` (starting with a letter or digit).
    """
    text = str(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    if text is None or not is_id(text):
        raise SetupError(f"{what} must be an int or a string of letters, digits, '.', '_' or '-' "
                         f"(starting with a letter or digit), not {value!r}")
    return text


def cache_file(name: str) -> str:
    """The file of the cached result ``name``."""
    return CACHE_PREFIX + check_id(name, "a cached result's name") + ".pt"


def is_cache_file(name: str) -> bool:
    """Whether ``name`` is the file of a cached result."""
    return name.startswith(CACHE_PREFIX) and name.endswith(".pt")


def cached_names(files: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The names of the cached results among a manifest's ``files`` (retired ones left out), sorted."""
    return sorted(n[len(CACHE_PREFIX):-len(".pt")] for n, r in files.items()
                  if is_cache_file(n) and not r.get("retired"))


def record_write(record: Mapping[str, Any], what: str, **fields: Any) -> Write:
    """The write of a record ``what`` (``"block"``, ``"state"``...), with its version, and its manifest fields."""
    payload = {**record, VERSION_KEY: RECORD_VERSION}
    return (lambda f: archive.save(payload, f)), {
        "kind": USER_KIND, "lineage": what, VERSION_KEY: RECORD_VERSION, "library_version": __version__,
        "torch_version": str(torch.__version__), **fields}


def payload_write(payload: dict[str, Any]) -> Write:
    """The write of one of the library's payloads (structure, model) and the fields of its manifest record."""
    return (lambda f: save_payload(payload, f)), fmt.record_fields(payload[fmt.HEADER_KEY])


def checked(record: Any, where: str) -> dict[str, Any]:
    """A record as read, without its version, after checking that this code reads that version.

    :raises IncompatibleCheckpointError: for a newer version, or one that is not a positive integer.
    """
    if not isinstance(record, dict):
        raise IncompatibleCheckpointError(f"{where} holds a {type(record).__name__}, not a record of "
                                          "experiment_io.lineage; delete its checkpoint to train it anew")
    version = record.get(VERSION_KEY, 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise IncompatibleCheckpointError(
            f"{where} gives its lineage record format version as {version!r}, which no version of experiment_io "
            "writes: the file is not one this library wrote. Delete its checkpoint to train it anew.")
    if version > RECORD_VERSION:
        raise IncompatibleCheckpointError(
            f"{where} was written with lineage record format version {version}, but this installation of "
            f"experiment_io ({__version__}) reads versions up to {RECORD_VERSION}. Upgrade experiment_io "
            "(pip install --upgrade experiment_io) to read it, or delete the checkpoint to train it anew with "
            "this version.")
    return {k: v for k, v in record.items() if k != VERSION_KEY}


def read_record(path: str) -> dict[str, Any]:
    """The record in the file ``path``: verified, loaded ``weights_only`` on the CPU, its version checked."""
    # on the CPU: load_state_dict puts each state where it belongs
    return checked(verified_load(path, map_location="cpu"), path)


def check_pair(record: Mapping[str, Any], states: Mapping[str, Any], where: str) -> None:
    """Check that a state file (``state.pt``, ``backup.pt``) belongs to the block record beside it.

    :raises IncompatibleCheckpointError: when they are of different ``train()`` calls.
    """
    if states.get("calls") != len(record["results"]):
        raise IncompatibleCheckpointError(
            f"{where}: its state file is of call {states.get('calls')} and its record of call {len(record['results'])} "
            "(one of them fell back to an older generation); re-run its block after deleting it")


#: A folder being removed: ``.deleting-<id>-<pid>`` (and ``@<host>`` since the host is recorded).
_DELETING = re.compile(r"\.deleting-(?P<id>[A-Za-z0-9][A-Za-z0-9._-]{0,99})-(?P<pid>[0-9]+)(?:@(?P<host>[^/@]+))?")


def remove_tree(directory: str) -> None:
    """Remove ``directory``: renamed aside first (one atomic step: from then on it is gone for every reader),
    then its parent synced, then removed. A removal killed midway leaves the folder aside, which
    :func:`sweep_deletions` removes later."""
    parent = os.path.dirname(directory)
    aside = os.path.join(parent, f".deleting-{os.path.basename(directory)}-{os.getpid()}@{socket.gethostname()}")
    os.replace(directory, aside)
    storage.fsync_directory(parent)
    shutil.rmtree(aside, ignore_errors=True)  # another process sweeping it at the same time removes the rest
    if os.path.lexists(aside):
        shutil.rmtree(aside)  # what is left, with its error


def sweep_deletions(parent: str) -> list[str]:
    """Remove the folders that removals killed midway left under ``parent`` (``.deleting-<id>-<pid>@<host>``: the
    library's own, named so when their removal began) whose process no longer runs on this host.

    A folder of another host's removal is left alone (that process may still run); so is anything of another
    name, or a link.

    :return: the names removed.
    """
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    host, removed = socket.gethostname(), []
    for name in names:
        match = _DELETING.fullmatch(name)
        path = os.path.join(parent, name)
        if match is None or os.path.islink(path) or not os.path.isdir(path):
            continue
        pid = int(match["pid"])
        if (match["host"] or host) != host or (pid != os.getpid() and storage.pid_alive(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            removed.append(name)
    if removed:
        log.info("removed %d folder(s) of removals that were killed midway in %s: %s", len(removed), parent,
                 ", ".join(removed))
    return removed


class Records:
    """The checkpoints of one model: a run directory per checkpoint under ``directory``.

    The ids it takes are checked already (:func:`check_id`). One writer per
    checkpoint is kept for the life of this object (made again when its directory
    was removed meanwhile).

    :param directory: the model's directory, ``<root>/<model id>``.
    :param sweep: remove what removals killed midway left there (:func:`sweep_deletions`); a model that is used
        to train does, a listing (which only reads) does not.
    """

    def __init__(self, directory: str, *, sweep: bool = False):
        self.directory = directory
        self._places: dict[str, RunDirectory] = {}
        if sweep:
            sweep_deletions(directory)

    def path(self, cp_id: str) -> str:
        """The directory of checkpoint ``cp_id``."""
        return os.path.join(self.directory, cp_id)

    def is_link(self, cp_id: str) -> bool:
        """Whether the place of checkpoint ``cp_id`` is a link (the library never makes one: it is read and
        written as if absent, see :meth:`_place`)."""
        return os.path.islink(self.path(cp_id))

    def _place(self, cp_id):
        """The run directory of checkpoint ``cp_id``.

        :raises CheckpointWriteError: when a link is in its place: reading or writing through it would reach
            files outside the model's directory.
        """
        if self.is_link(cp_id):
            raise CheckpointWriteError(
                f"{self.path(cp_id)} is a link (to {os.readlink(self.path(cp_id))}), not a checkpoint folder of "
                "experiment_io.lineage, which makes its folders itself: nothing is read or written through it. "
                f"Remove the link ({self.path(cp_id)}) to use checkpoint {cp_id}.")
        place = self._places.get(cp_id)
        if place is None or not os.path.isdir(place.location):
            place = self._places[cp_id] = RunDirectory(self.path(cp_id))
        return place

    def on_disk(self) -> list[str]:
        """The names of the checkpoint directories under the model's directory (in no particular order; links
        and folders being removed are not checkpoints)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            path = os.path.join(self.directory, name)
            if name.startswith(".") or not os.path.isdir(path):
                continue
            if os.path.islink(path):
                log.warning("%s is a link, not a checkpoint folder of experiment_io.lineage: left out", path)
                continue
            found.append(name)
        return found

    def manifest(self, cp_id: str) -> dict[str, dict[str, Any]]:
        """The records of the committed files of checkpoint ``cp_id``, read from its manifest (``{}``: none, or a
        link in its place)."""
        if self.is_link(cp_id):
            return {}
        manifest = read_manifest(self.path(cp_id))
        return manifest[1] if manifest else {}

    def has(self, cp_id: str, name: str) -> bool:
        """Whether checkpoint ``cp_id`` has a committed file ``name`` (an unreadable manifest: no)."""
        try:
            record = self.manifest(cp_id).get(name)
        except OSError:
            return False
        return record is not None and not record.get("retired")

    def read(self, cp_id: str, name: str) -> dict[str, Any]:
        """The record ``name`` of checkpoint ``cp_id``.

        :raises CheckpointNotFoundError: when it has none.
        :raises IncompatibleCheckpointError: when it was written by a newer version (see :data:`RECORD_VERSION`).
        """
        return read_record(self._place(cp_id).path(name))

    def block(self, cp_id: str) -> Optional[dict[str, Any]]:
        """The block record of checkpoint ``cp_id`` (``None`` when it has none)."""
        return self.read(cp_id, BLOCK_NAME) if self.has(cp_id, BLOCK_NAME) else None

    def cached(self, cp_id: str) -> list[str]:
        """The names of the cached results of checkpoint ``cp_id``."""
        try:
            return cached_names(self.manifest(cp_id))
        except OSError:
            return []

    def record(self, cp_id: str, name: str) -> Optional[dict[str, Any]]:
        """The manifest record of ``name`` as the writer of checkpoint ``cp_id`` knows it (``None``: none)."""
        return self._place(cp_id).writer.record(name)

    def live(self, cp_id: str) -> list[str]:
        """The files of checkpoint ``cp_id`` that its writer committed and did not retire."""
        return [name for name, record in self._place(cp_id).writer.files.items() if not record.get("retired")]

    def save(self, cp_id: str, writes: Mapping[str, Write], retire: Sequence[str] = ()) -> None:
        """Write ``writes`` (``{name: (write, fields)}``) into checkpoint ``cp_id`` and retire ``retire``, in one
        save committed by its manifest."""
        self._place(cp_id).writer.save_files(writes, retire=retire)

    def lock(self, cp_id: str) -> RunLock:
        """The lock of checkpoint ``cp_id`` (its directory created); enter it to hold it."""
        return self._place(cp_id).lock()

    def remove(self, cp_id: str) -> None:
        """Remove checkpoint ``cp_id`` with every file in it (a link in its place: the link, not what it points to)."""
        if self.is_link(cp_id):
            os.unlink(self.path(cp_id))
        else:
            remove_tree(self.path(cp_id))
        self._places.pop(cp_id, None)

    def remove_all(self) -> None:
        """Remove every checkpoint of the model, and its directory."""
        if os.path.isdir(self.directory):
            remove_tree(self.directory)
        self._places.clear()
