"""Generations: which file of a run holds which committed state, written and chosen in one place.

Every file of a run directory has up to two *generations*: the file itself and
its previous generation, ``<name>.prev<ext>`` (:func:`previous_name`), kept until
the next save has committed. :class:`~experiment_io.storage.writer.RunWriter` is the only code that rotates
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
from dataclasses import dataclass
from typing import Iterator, Sequence

from experiment_io.errors import (CheckpointNotFoundError, CorruptCheckpointError,
                                  IncompatibleCheckpointError)
from experiment_io.storage import verification

__all__ = ["previous_name", "base_name", "Generation", "Role", "Search", "Pick"]

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
            # a file that only grows holds what its record describes in its first bytes
            fitting = [r for r in records if r["size"] == size or (r.get("appended") is True and r["size"] <= size)]
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
