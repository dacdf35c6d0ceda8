"""Picking what a load reads: a structure generation and a state generation written for it.

:func:`pick_structure_and_state` loads the structure file while the state file is
looked for and verified in a second thread.
"""
import contextlib
import contextvars
import logging
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

from experiment_io.errors import CheckpointNotFoundError, CorruptCheckpointError
from experiment_io.platform.threads import worker_thread
from experiment_io.run.payloads import STRUCTURE_NAME
from experiment_io.storage.generations import Search, previous_name
from experiment_io.storage.verification import Verifier

__all__ = ["pick_structure_and_state", "INLINE_BELOW"]

if TYPE_CHECKING:
    from experiment_io.storage.generations import Role

log = logging.getLogger(__name__)


#: State files that hold fewer bytes than this together are verified after the structure is loaded, in the
#: caller's thread: starting a thread would cost more than it saves.
INLINE_BELOW = 1024 * 1024


class _Concurrently:
    """Runs ``fn()`` in a thread, in a copy of the caller's context (:mod:`contextvars`); :meth:`result` waits for
    it and returns or raises what it did. ``inline``: ``fn()`` runs in :meth:`result` instead."""

    def __init__(self, fn, inline=False):
        self._outcome = None
        if inline:
            self._thread, self._fn = None, fn
            return
        context = contextvars.copy_context()
        self._thread = worker_thread(self._run, lambda: context.run(fn), name="experiment_io-verify", daemon=True)
        self._thread.start()

    def _run(self, fn):
        try:
            self._outcome = (True, fn())
        except BaseException as e:  # handed to the caller by result()
            self._outcome = (False, e)

    def result(self):
        if self._thread is None:
            fn, self._fn = self._fn, None
            if fn is not None:
                self._run(fn)
        else:
            self._thread.join()
        ok, value = self._outcome
        if not ok:
            raise value
        return value


def pick_structure_and_state(verifier: Verifier, roles: "Sequence[Union[Role, str]]", strict: bool, newest_first: bool,
                             load_structure: Callable[[str, dict], Any],
                             meanwhile: Optional[Callable[[], Any]] = None) -> tuple[str, dict, Any, str, dict]:
    """A structure generation, loaded, and a state generation written for it (newest first).

    While the structure file is loaded (``load_structure(path, record)``), the state
    file is looked for and verified in a second thread: the verification of the
    state reads its file while the structure is unpickled, and then while
    ``meanwhile()`` runs, if given (once, after the first structure loaded). State
    files of fewer than :data:`INLINE_BELOW` bytes are verified after, in this thread.

    :return: ``(structure_path, structure_record, structure, state_path, state_record)``.
    """
    structures = Search(verifier, [STRUCTURE_NAME], strict)
    names = [str(getattr(role, "name", role)) for role in roles]
    small = sum(verifier.files[n].get("size", 0) for n in {*names, *(previous_name(n) for n in names)}
                if n in verifier.files) < INLINE_BELOW
    error = None
    for structure_path, structure_record in structures:
        digest = structure_record["digest"]
        state_pick = _Concurrently(lambda: Search(verifier, roles, strict, newest_first=newest_first).first(digest),
                                   inline=small)
        try:
            structure = load_structure(structure_path, structure_record)
        except BaseException as load_error:
            try:
                state_pick.result()
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                if isinstance(load_error, Exception):  # no state for this structure: it would not be loaded
                    error = error or e
                    continue
            except Exception:  # the load's error is the one to report
                pass
            raise
        if meanwhile is not None:
            run, meanwhile = meanwhile, None
            try:
                run()
            except BaseException:  # the verification thread is joined before the error goes on
                with contextlib.suppress(Exception):
                    state_pick.result()
                raise
        try:
            pick = state_pick.result()
        except (CorruptCheckpointError, CheckpointNotFoundError) as e:
            error = error or e
            continue
        if structures.problems:
            log.warning("using %s; skipped: %s", structure_path, "; ".join(structures.problems))
        return structure_path, structure_record, structure, pick.path, pick.record
    if error is not None:
        raise error
    if not structures.problems:
        raise CheckpointNotFoundError(f"{verifier.directory} holds no {STRUCTURE_NAME}: nothing there can be loaded "
                                      "as a model (its manifest records no structure file)")
    raise CorruptCheckpointError(f"no intact {STRUCTURE_NAME} in {verifier.directory}:\n  - "
                                 + "\n  - ".join(structures.problems))


