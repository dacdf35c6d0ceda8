"""Provenance: where a checkpoint came from, recorded in its manifest record.

Every checkpoint and model file's record carries the host that wrote it, the
command line, the SLURM job id and restart count under SLURM, and the git commit
of the training script's repository (and whether its tree had uncommitted
changes) when the script lives in a git repository. The library and torch
versions, the world size and how many times the run was resumed are recorded
beside them. Nothing here can fail a save: a value that cannot be found (no git,
a git that hangs, no SLURM) is simply absent.
"""
import functools
import logging
import os
import shutil
import socket
import subprocess
import sys
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["process_provenance", "PROVENANCE_FIELDS"]

#: The record fields this module fills, and what each means (for ``experiment-io info``).
PROVENANCE_FIELDS = {
    "host": "host",
    "command": "command line",
    "slurm_job_id": "SLURM job",
    "slurm_restart_count": "SLURM restarts",
    "git_commit": "git commit",
    "git_dirty": "uncommitted changes",
}

#: The longest command line recorded (characters).
COMMAND_MAX = 2000
#: How long a ``git`` call for the provenance may take (seconds) before the commit is left out.
GIT_TIMEOUT = 5.0


def _git(directory, timeout, *args):
    result = subprocess.run(["git", "--no-optional-locks", "-C", directory, *args], capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        return None
    return result.stdout


def _git_state(directory, timeout):
    """``{"git_commit": ..., "git_dirty": ...}`` of the repository holding ``directory``, or ``{}``."""
    if shutil.which("git") is None:
        return {}
    try:
        commit = _git(directory, timeout, "rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("no git commit recorded: %s", e)
        return {}
    if not commit:
        return {}
    state = {"git_commit": commit.strip()}
    try:
        status = _git(directory, timeout, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError) as e:  # the commit is known; whether the tree is dirty is not
        log.debug("whether %s has uncommitted changes is not recorded: %s", directory, e)
        return state
    if status is not None:
        state["git_dirty"] = bool(status.strip())
    return state


def _script_directory():
    script = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c", "-m") else ""
    directory = os.path.dirname(os.path.abspath(script)) if script else os.getcwd()
    return directory if os.path.isdir(directory) else os.getcwd()


def process_provenance(*, git_timeout: float = GIT_TIMEOUT, fresh: bool = False) -> dict[str, Any]:
    """The provenance fields of this process (a dict of plain scalars, possibly empty).

    They are found at the first call and kept for the process's life (the host, the command and the commit of
    the script do not change while it runs).

    :param git_timeout: how long each ``git`` call may take.
    :param fresh: find them again.
    """
    if fresh:
        _found.cache_clear()
    return dict(_found(git_timeout))


@functools.lru_cache(maxsize=None)
def _found(git_timeout: float) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    try:
        fields["host"] = socket.gethostname()
    except OSError:  # pragma: no cover
        pass
    command = " ".join([os.path.basename(sys.executable)] + list(sys.argv))
    fields["command"] = command if len(command) <= COMMAND_MAX else command[:COMMAND_MAX] + "..."
    if os.environ.get("SLURM_JOB_ID"):
        fields["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        try:
            fields["slurm_restart_count"] = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        except ValueError:
            pass
    try:
        fields.update(_git_state(_script_directory(), git_timeout))
    except Exception as e:  # noqa: BLE001 - provenance never fails a save
        log.debug("no git commit recorded: %r", e)
    return fields
