"""Generations: which file of a run holds which committed state, written and chosen in one place.

Every file of a run directory has up to two *generations*: the file itself and
its previous generation, ``<name>.prev<ext>`` (:func:`previous_name`), kept until
the next save has committed. :class:`RunWriter` is the only code that rotates
them and commits a save by rewriting the manifest; :class:`Search` is the only
code that ranks them when reading. The loaders, :func:`~experiment_io.verified_load`
and the command line all choose files through :class:`Search`, so they cannot
disagree about which generation is the good one.

A generation is identified by its digest, not by its name: after a crash between
a rename and the manifest's commit, the committed state may lie under the other
name of its pair, and it is still found. A file of which no save was ever
committed (the manifest records neither it nor its previous generation: a run
killed during its first save of that file) is not a checkpoint: it is ignored, and
the next save replaces it.
"""
from __future__ import annotations

import enum
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence, cast

from experiment_io.errors import (CheckpointNotFoundError, CheckpointWriteError, CorruptCheckpointError,
                                  IncompatibleCheckpointError, NotACheckpointError)
from experiment_io.format import codec as fmt
from experiment_io.storage import atomic as storage
from experiment_io.storage import verification
from experiment_io.storage.interface import RunStorage, as_storage
from experiment_io.storage.manifest import MANIFEST_NAME, manifest_identity, read_manifest, write_manifest

__all__ = ["previous_name", "base_name", "Generation", "Role", "RunWriter", "Search", "Pick"]

log = logging.getLogger(__name__)

_PREVIOUS = ".prev"


def previous_name(name: str) -> str:
    """The name under which the previous generation of ``name`` is kept (``a.pt`` -> ``a.prev.pt``)."""
    base, ext = os.path.splitext(name)
    return f"{base}{_PREVIOUS}{ext}"


def base_name(name: str) -> str:
    """The inverse of :func:`previous_name`: the name whose generation ``name`` is (``a.prev.pt`` -> ``a.pt``)."""
    base, ext = os.path.splitext(name)
    return base[:-len(_PREVIOUS)] + ext if base.endswith(_PREVIOUS) else name


def is_previous_name(name: str) -> bool:
    """Whether ``name`` is the name of a previous generation."""
    return base_name(name) != name


class Generation(enum.Enum):
    """Which generations of a file a :class:`Role` admits: ``ANY`` (the committed one
    or the previous one), ``CURRENT`` (only the committed one, wherever a crash left
    it) or ``PREVIOUS`` (only the previous one)."""

    ANY = "any"
    CURRENT = "current"
    PREVIOUS = "previous"


@dataclass(frozen=True)
class Role:
    """A file of a run that a load may read, and which of its generations it accepts.

    :ivar name: the file's name (``"last_checkpoint.pt"``).
    :ivar generation: the generations admitted.
    """

    name: str
    generation: Generation = Generation.ANY


def _as_role(role: Role | str) -> Role:
    return role if isinstance(role, Role) else Role(role)


@dataclass(frozen=True)
class Pick:
    """The generation a :class:`Search` chose.

    :ivar path: the file that holds it.
    :ivar record: its manifest record.
    :ivar problems: what was skipped on the way, one text per file.
    """

    path: str
    record: dict
    problems: tuple

    @property
    def committed(self) -> bool:
        """Whether this is the committed generation of its file (not a fallback)."""
        return not self.problems


class Search:
    """The generations of some files of a run, verified one by one, best first.

    Candidates (a file and a manifest record of its size) are ranked without reading
    any file; iterating verifies them in rank order, each file read at most once
    (through the :class:`~experiment_io.storage.verification.Verifier`), and yields those that
    verify as ``(path, record)``. The first one yielded is the generation that a
    verification of every file would pick; only the files ranked before it are read.

    :param verifier: the run directory's verifier.
    :param roles: :class:`Role`\\ s (or plain names) in order of preference.
    :param strict: consider only the committed generation of the first role the
        manifest lists: no fallback.
    :param newest_first: rank by step first, whatever the role (ties go to the
        earlier role); otherwise by role first, then newest first.
    :ivar problems: one text per file found wrong so far.
    """

    problems: list[str]
    _reported: dict[str, bool]

    def __init__(self, verifier: verification.Verifier, roles: Sequence[Role | str], strict: bool = False, *,
                 newest_first: bool = False):
        self.verifier, self.strict, self.problems, self.newest_first = verifier, strict, [], newest_first
        #: files of the roles that no committed save wrote (left by a save killed before its commit)
        self.uncommitted: list[str] = []
        self.roles = [_as_role(r) for r in roles]
        files = verifier.files
        if strict:
            first = next((r for r in self.roles if r.name in files), self.roles[0])
            self.roles = [Role(first.name, Generation.CURRENT)]
        self._candidates, self._reported = [], {}
        for rank, role in enumerate(self.roles):
            current = files.get(role.name)
            records = [files[n] for n in (role.name, previous_name(role.name)) if n in files]
            if role.generation is not Generation.ANY:
                records = [r for r in records if (r is current) == (role.generation is Generation.CURRENT)]
            pairs, problems = self._by_size(role.name, records)
            if role.generation is not Generation.PREVIOUS:  # an older generation's problems come with the current one
                for problem in problems:
                    self.report(problem)
            for order, (path, record) in enumerate(pairs):
                step, written = record.get("step", 0), record.get("written_at", 0)
                key = (-step, rank, -written, order) if newest_first else (rank, -step, -written, order)
                self._candidates.append((key, path, record))
                self._reported.setdefault(path, role.generation is Generation.PREVIOUS)
        self._candidates.sort(key=lambda c: c[0])

    def _by_size(self, name, records):
        """``(path, record)`` for every existing generation file of ``name`` whose size fits a record."""
        pairs, problems = [], []
        committed = name in self.verifier.files or previous_name(name) in self.verifier.files
        for candidate in (name, previous_name(name)):
            path = self.verifier.path(candidate)
            st = self.verifier.storage.stat(candidate)
            if st is None:
                if candidate in self.verifier.files:
                    problems.append(f"{path}: missing, although the manifest lists it")
                continue
            if not st.regular:  # a symbolic link, a FIFO, a device: never read
                problems.append(f"{path}: not a regular file (a link or a special file); it is not read")
                continue
            size = st.size
            if not committed:  # a save renamed it into place and was killed before its commit
                log.warning("ignoring %s: the manifest records no save of it (a save was interrupted before its "
                            "commit, or the manifest was replaced); the next save moves it aside, it is not lost", path)
                self.uncommitted.append(path)
                continue
            fitting = [r for r in records if r["size"] == size]
            if not fitting:
                own = self.verifier.files.get(candidate)
                if own is not None and all(own is not r for r in records) and own["size"] == size:
                    continue  # the other generation, not asked for (strict): no problem of its own
                problems.append(self.verifier.describe(path, own, size=size))
            pairs += [(path, r) for r in fitting]
        return pairs, problems

    def report(self, problem: str) -> None:
        """Note a problem (once)."""
        if problem not in self.problems:
            self.problems.append(problem)

    def __iter__(self) -> Iterator[tuple]:
        verifier = self.verifier
        for _, path, record in self._candidates:
            if verifier.matches(path, record):
                yield path, record
            elif not self._reported[path] and not any(verifier.matches(p, r)
                                                      for _, p, r in self._candidates if p == path):
                self._reported[path] = True
                own = verifier.files.get(os.path.basename(path))
                if own is not None and own is not record and verifier.matches(path, own):
                    continue  # intact, but the other generation, which was not asked for (strict)
                self.report(verifier.describe(path, record))

    def _newest_committed(self):
        """The newest record the manifest commits for the roles' names (``None`` when it has none)."""
        records = [self.verifier.files[r.name] for r in self.roles
                   if r.generation is not Generation.PREVIOUS and r.name in self.verifier.files]
        return max(records, key=lambda r: r.get("step", 0), default=None)

    def all(self) -> tuple:
        """Verify every candidate: ``([(path, record)], problems)``, best first."""
        found = list(self)
        return found, list(self.problems)

    def first(self, structure_digest: str | None = None) -> Pick:
        """The best generation that verifies (and was written for ``structure_digest``, when given).

        :raises CheckpointNotFoundError: when no file of the roles exists.
        :raises CorruptCheckpointError: when none verifies (in strict mode: when the
            committed generation does not).
        :raises IncompatibleCheckpointError: in strict mode, when the committed
            generation belongs to another structure file.
        """
        for path, record in self:
            if structure_digest is not None and record.get("structure_digest") not in (None, structure_digest):
                problem = f"{path}: written for another structure file than the one loaded"
                if self.strict:
                    raise IncompatibleCheckpointError(f"{problem} (strict=True).")
                self.report(problem)
                continue
            newest = self._newest_committed() if self.newest_first else None
            rollback = newest is not None and record.get("step", 0) < newest.get("step", 0)
            if rollback and newest is not None:
                self.report(f"the committed generation (step {newest.get('step')}) is missing or damaged; an older "
                            f"one (step {record.get('step', 0)}) is used: the run goes back "
                            f"{newest.get('step', 0) - record.get('step', 0)} step(s)")
            if self.problems:
                # the committed generation found under the previous name, where a save that was interrupted
                # after renaming its new file into place left it: the skipped file is that uncommitted new one
                name = os.path.basename(path)
                interrupted = (is_previous_name(name) and self.verifier.files.get(base_name(name)) is record
                               and len(self.problems) == 1 and not rollback)
                (log.info if interrupted else log.warning)("using %s; skipped: %s", path, "; ".join(self.problems))
            return Pick(path, record, tuple(self.problems))
        names = " or ".join(sorted({role.name for role in self.roles}))
        if not self.problems:
            raise CheckpointNotFoundError(
                f"{self.verifier.directory} has no {names}: no checkpoint has been written there yet. "
                "Start the run from the beginning."
            )
        listed = "\n  - ".join(self.problems)
        if self.strict:
            raise CorruptCheckpointError(
                f"the committed generation of {names} in {self.verifier.directory} does not verify, and strict=True "
                f"allows no fallback to an older one:\n  - {listed}\nLoad without strict=True to fall back.")
        raise CorruptCheckpointError(f"no intact generation of {names} in {self.verifier.directory}:\n  - {listed}")


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

    def save_files(self, writes: Mapping[str, tuple], retire: Sequence[str] = (),
                   kept: Mapping[str, str] | None = None) -> dict:
        """Write several files, then commit them by writing the manifest.

        :param writes: ``{file name: (write, fields)}``: ``write(f)`` writes the
            file's bytes to ``f``; ``fields`` (plain data) go into its manifest record.
        :param retire: files to remove (with their previous generations): their records
            are marked retired in the manifest that commits this save, then the files
            are unlinked and a manifest without their records is written.
        :param kept: ``{file name: why a retention keeps it}``, recorded as the ``"kept"`` field.
        :return: ``{file name: FileRecord}``.
        """
        if manifest_identity(self.storage) != self._manifest_identity:
            log.info("the manifest of %s was changed by another writer; reading it again", self.directory)
            self._reload()
        self._unlink_retired()  # left by a save that did not finish its removals
        snapshot = {name: dict(record) if isinstance(record, dict) else record for name, record in self.files.items()}
        self._written = {}
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
                for name, why in (kept or {}).items():
                    if name in self.files and not verification.is_retired(self.files[name]):
                        self.files[name] = {**self.files[name], "kept": why}
                batch.write(MANIFEST_NAME, lambda f: f.write(fmt.manifest_to_bytes(self.files)))
                # the files and the manifest are fsynced together (one wait); the manifest is renamed
                # into place only once every file's rename is durable
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
        except BaseException:
            self.files = snapshot  # nothing of this save was committed
            self._known_good.clear()
            self._manifest_identity = None  # read the manifest again before the next save
            raise
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
        """Keep a file that no record describes (a checkpoint whose record was lost?) under a new name."""
        for candidate in (name, previous_name(name)):
            if self.storage.stat(candidate) is not None:
                aside = f"{candidate}.orphan-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
                self.storage.move_aside(candidate, aside)
                log.warning("%s has no manifest record: moved aside to %s before a new save takes its name",
                            self.path(candidate), aside)

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
