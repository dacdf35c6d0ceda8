"""The writer of a run: the only code that rotates a run's generations and commits a save in its manifest."""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Mapping, Sequence, cast

from experiment_io.errors import CheckpointWriteError, CorruptCheckpointError, NotACheckpointError
from experiment_io.format import codec as fmt
from experiment_io.storage import atomic as storage
from experiment_io.storage import verification
from experiment_io.storage.appended import APPENDED
from experiment_io.storage.generations import previous_name
from experiment_io.storage.interface import RunStorage, as_storage
from experiment_io.storage.manifest import (MANIFEST_NAME, PREVIOUS_MANIFEST_NAME, manifest_identity, read_manifest,
                                            write_manifest)
from experiment_io.platform.threads import worker_thread

__all__ = ["RunWriter", "ORPHANS_KEPT"]

log = logging.getLogger(__name__)

#: How many files that no save committed are kept (set aside as ``<name>.orphan-<time>-<pid>``) per file name.
ORPHANS_KEPT = 3
_ORPHAN = ".orphan-"


class RunWriter:
    """Writes the files of one run directory and commits each save in its manifest.

    The files of a save and the new manifest are written in one batch of the run's
    storage (:meth:`~experiment_io.storage.interface.RunStorage.batch`); each file's
    previous generation is kept (with its record) until the next save; the manifest is
    published last, so it lists only files that were completely written. Keep one
    writer per directory for the life of a run: it remembers which files it committed
    itself, so a save rotates them without reading them again.
    A manifest changed by someone else meanwhile is noticed and read again.

    :param directory: the run's :class:`~experiment_io.storage.interface.RunStorage`, or its directory (created
        if missing).
    """

    def __init__(self, directory: str | os.PathLike | RunStorage):
        self.storage = as_storage(directory)
        self.directory = self.storage.location
        self.storage.create()
        self._manifest_identity: tuple | None = None
        self._behind: threading.Thread | None = None  # making the newest save durable
        self._behind_error: BaseException | None = None
        self._durable_known = False  # whether the committed files are known to be durable
        self._reload()

    def _reload(self):
        self.storage.remove_stale_temporaries()
        try:
            existing = read_manifest(self.storage)
        except (NotACheckpointError, CorruptCheckpointError) as e:
            log.warning("ignoring an unreadable manifest in %s (%s); a new one will be written", self.directory, e)
            existing = None
        self.files = dict(existing[1]) if existing else {}
        self._known_good = {}  # name -> identity of the file this writer committed under that name
        self._manifest_identity = manifest_identity(self.storage)

    def path(self, name: str) -> str:
        """The path of ``name`` in the run directory."""
        return self.storage.path(name)

    def record(self, name: str) -> dict | None:
        """The manifest record of ``name`` (``None`` when it has none)."""
        return self.files.get(name)

    def has_intact(self, name: str) -> bool:
        """Whether ``name`` exists, is readable and matches its manifest record."""
        try:
            return verification.file_matches(self.path(name), self.files.get(name))
        except OSError:
            return False

    def wait_durable(self) -> None:
        """Wait until the save made durable behind the caller (``save_files(durable=False)``) is durable.

        :raises CheckpointWriteError: when it could not be made durable (the save is committed: a crash of the
            process does not lose it, a power loss may).
        """
        if self._behind is not None:
            self._behind.join()
            self._behind = None
            self._durable_known = self._behind_error is None
        error, self._behind_error = self._behind_error, None
        if error is not None:
            self._durable_known = False
            raise CheckpointWriteError(f"the checkpoint committed last in {self.directory} could not be made durable "
                                       f"({error}); it is kept, and a power loss could take it") from error

    def _make_committed_durable(self):
        """fsync the files the manifest records, the manifest and the directory (before the first save made
        durable behind: a process before this one may have committed files it never made durable)."""
        for name in [n for n, r in self.files.items() if not verification.is_retired(r)] + [MANIFEST_NAME]:
            try:
                fd, _ = self.storage.open(name)
            except (OSError, ValueError):
                continue
            try:
                os.fsync(fd)
            except OSError as e:
                raise CheckpointWriteError(f"could not make {self.path(name)} durable: {e}") from e
            finally:
                os.close(fd)
        storage.FileBatch.sync_directory(self.directory)
        self._durable_known = True

    def _durable_behind(self, detached, appended):
        def make_durable():
            try:
                for grown, _, _ in (appended or {}).values():
                    grown.make_durable()
                detached()
            except BaseException as e:  # reported by the next wait_durable()
                self._behind_error = e

        self._behind = worker_thread(make_durable, name="experiment_io-durability", daemon=False)
        self._behind.start()

    def save_files(self, writes: Mapping[str, tuple], retire: Sequence[str] = (),
                   kept: Mapping[str, str] | None = None, appended: Mapping[str, tuple] | None = None, *,
                   durable: bool = True) -> dict:
        """Write several files, then commit them by writing the manifest.

        :param writes: ``{file name: (write, fields)}``: ``write(f)`` writes the
            file's bytes to ``f``; ``fields`` (plain data) go into its manifest record.
        :param retire: files to remove (with their previous generations): their records
            are marked retired in the manifest that commits this save, then the files
            are unlinked and a manifest without their records is written.
        :param kept: ``{file name: why a retention keeps it}``, recorded as the ``"kept"`` field.
        :param appended: ``{file name: (file, record, fields)}`` of files that only grow
            (:class:`~experiment_io.storage.appended.AppendedFile`): each is made durable
            with the save's files and committed as ``record`` (its size and digest as
            far as this save goes), with ``"appended": true``; never rotated.
        :param durable: ``False``: the save is committed when its files and manifest are renamed into place (a
            crash of the process cannot lose it) and made durable (fsync) in a thread behind the caller. Before
            the next save rotates it into the previous generation, it is waited for: of the two generations a
            save keeps, the older one is always durable, so a power loss costs at most the newest save (the
            manifest it replaced is kept as ``experiment_manifest.prev.json`` for that case).
        :return: ``{file name: FileRecord}``.
        """
        self.wait_durable()  # the save before is durable before this one rotates it
        if not durable and not self._durable_known:
            self._make_committed_durable()
        if manifest_identity(self.storage) != self._manifest_identity:
            log.info("the manifest of %s was changed by another writer; reading it again", self.directory)
            self._reload()
        self._unlink_retired()  # left by a save that did not finish its removals
        snapshot = {name: dict(record) if isinstance(record, dict) else record for name, record in self.files.items()}
        self._written: dict = {}
        for name in retire:
            for candidate in (name, previous_name(name)):
                if candidate in self.files and candidate not in writes:
                    self.files[candidate] = {**self.files[candidate], "retired": True}
                    self._known_good.pop(candidate, None)
        try:
            with self.storage.batch() as batch:
                keep_previous, records = {}, {}
                for name, (write, fields) in writes.items():
                    keep_previous[name] = self._rotation(name)
                    records[name] = cast(verification.FileRecord, batch.write(name, write))  # hashed: a record
                    self.files[name] = {**records[name].as_dict(), **fields, "written_at": time.time()}
                for name, (grown, record, fields) in (appended or {}).items():
                    self.files[name] = {**record.as_dict(), APPENDED: True, **fields, "written_at": time.time()}
                    previous = previous_name(name)  # a file that only grows has no generations
                    if previous in self.files and previous not in writes:
                        self.files[previous] = {**self.files[previous], "retired": True}
                    self._known_good.pop(name, None)
                for name, why in (kept or {}).items():
                    if name in self.files and not verification.is_retired(self.files[name]):
                        self.files[name] = {**self.files[name], "kept": why}
                batch.write(MANIFEST_NAME, lambda f: f.write(fmt.manifest_to_bytes(self.files)))
                if durable:
                    for grown, _, _ in (appended or {}).values():
                        grown.make_durable()
                    self._publish_durably(batch, writes, keep_previous)
                else:
                    detached = self._publish_unsynced(batch, writes, keep_previous)
        except BaseException:
            self.files = snapshot  # nothing of this save was committed
            self._known_good.clear()
            self._manifest_identity = None  # read the manifest again before the next save
            raise
        if not durable:
            self._durable_behind(detached, appended)
        return self._committed(records)

    def _publish_durably(self, batch, writes, keep_previous):
        """The files and the manifest fsynced together (one wait); the manifest renamed into place only once
        every file's rename is durable."""
        batch.make_durable()
        for name in writes:
            batch.publish(name, keep_previous[name])
            self._written[name] = self._identity(name)
        batch.sync()
        for name in writes:
            storage.write_step("directory_fsynced", self.path(name))
        for name in writes:
            storage.write_step("file_saved", self.path(name))
        storage.write_step("manifest", self.directory)
        batch.publish(MANIFEST_NAME)
        batch.sync()
        storage.write_step("directory_fsynced", self.path(MANIFEST_NAME))
        self._durable_known = True

    def _publish_unsynced(self, batch, writes, keep_previous):
        """The files, then the manifest (the one it replaces kept as the previous manifest), renamed into place
        before they are durable; what makes them durable, to be called behind."""
        for name in writes:
            batch.publish_unsynced(name, keep_previous[name])
            self._written[name] = self._identity(name)
            storage.write_step("file_saved", self.path(name))
        storage.write_step("manifest", self.directory)
        batch.publish_unsynced(MANIFEST_NAME, PREVIOUS_MANIFEST_NAME)
        self._durable_known = False
        return batch.detach()

    def _committed(self, records):
        """After a save's commit: what this writer knows of it; the retired files removed."""
        self._manifest_identity = manifest_identity(self.storage)
        self._known_good.update(self._written)
        if self._unlink_retired():
            try:  # the save is committed: a failure here only leaves retired records for the next save to drop
                write_manifest(self.storage, self.files)
            except CheckpointWriteError as e:
                log.warning("the files the retention removed are still listed as retired in the manifest of %s: %s",
                            self.directory, e)
                self._manifest_identity = None  # read it again before the next save
            else:
                self._manifest_identity = manifest_identity(self.storage)
        return records

    def _unlink_retired(self):
        """Remove the files whose records are retired, and their records (not yet written); whether there were any."""
        retired = [name for name, record in self.files.items() if verification.is_retired(record)]
        for name in retired:
            try:
                self.storage.remove(name)
            except OSError as e:  # kept recorded as retired: tried again at the next save
                log.warning("could not remove %s, which the retention no longer keeps: %s", self.path(name), e)
                continue
            del self.files[name]
            log.info("removed %s (not kept by the retention)", name)
        return bool(retired)

    def _set_aside(self, name):
        """Keep a file that no record describes (a checkpoint whose record was lost?) under a new name; of the
        files so kept for one name, the newest :data:`ORPHANS_KEPT` stay, older ones are removed (and said)."""
        for candidate in (name, previous_name(name)):
            if self.storage.stat(candidate) is not None:
                now = time.time_ns()  # to the nanosecond: names sort by time, also within one second
                # in UTC: a change of the local clock (daylight saving) keeps the order
                when = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now // 10**9)) + f".{now % 10**9:09d}"
                aside = f"{candidate}{_ORPHAN}{when}-{os.getpid()}"
                self.storage.move_aside(candidate, aside)
                log.warning("%s has no manifest record: moved aside to %s before a new save takes its name",
                            self.path(candidate), aside)
                self._bound_orphans(candidate)

    def _bound_orphans(self, name):
        """Remove the files set aside for ``name`` beyond the newest :data:`ORPHANS_KEPT` (the name sorts by time).

        Such a file might be a checkpoint whose record was lost, so a few are kept; each of a run's kills between
        a save's renames and its commit leaves one, and they are not kept without end."""
        kept = sorted((n for n in self.storage.names() if n.startswith(name + _ORPHAN)), reverse=True)
        for old in kept[ORPHANS_KEPT:]:
            try:
                self.storage.remove(old)
            except OSError as e:
                log.warning("could not remove %s: %s", self.path(old), e)
                continue
            log.warning("removed %s: a file no save committed, set aside earlier; the newest %d such files of %s "
                        "are kept", self.path(old), ORPHANS_KEPT, name)

    def _identity(self, name):
        found = self.storage.stat(name)
        return None if found is None else found.identity

    def _still_committed(self, name):
        """Whether the file at ``name`` is, untouched, the one this writer committed (one ``stat``, no read)."""
        known = self._known_good.get(name)
        return known is not None and known == self._identity(name)

    def _rotation(self, name: str):
        """Where the committed file at ``name`` goes when the new one takes its place (``None``: nowhere, it is
        not the committed one); the records of the previous generation updated accordingly."""
        previous = previous_name(name)
        committed = self.files.get(name)
        if self._still_committed(name) or verification.file_matches(self.path(name), committed):
            # the committed file becomes the previous generation
            keep_previous = previous
            self.files[previous] = committed
        else:
            # the file at ``name`` is absent, damaged, or an uncommitted leftover of a
            # crashed save: replace it, and keep whichever previous generation verifies
            keep_previous = None
            if committed is None and self.files.get(previous) is None:
                self._set_aside(name)
            if verification.file_matches(self.path(previous), committed):
                self.files[previous] = committed
            elif not verification.file_matches(self.path(previous), self.files.get(previous)):
                self.files.pop(previous, None)
        if self.files.get(previous) is None:
            self.files.pop(previous, None)
        return keep_previous
