"""Provenance: where a checkpoint came from, recorded in its manifest record.

Every checkpoint and model file's record carries the host that wrote it, the
command line, the SLURM job id and restart count under SLURM, and the git commit
of the training script's repository (and whether its tree had uncommitted
changes) when the script lives in a git repository. The library and torch
versions, the world size and how many times the run was resumed are recorded
beside them. Nothing here can fail a save: a value that cannot be found (no git,
a git that hangs, no SLURM) is simply absent.
"""
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
_GIT_TIMEOUT = 5.0

_cached = None


def _git(directory, *args):
    result = subprocess.run(["git", "--no-optional-locks", "-C", directory, *args], capture_output=True, text=True,
                            timeout=_GIT_TIMEOUT, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        return None
    return result.stdout


def _git_state(directory):
    """``{"git_commit": ..., "git_dirty": ...}`` of the repository holding ``directory``, or ``{}``."""
    if shutil.which("git") is None:
        return {}
    try:
        commit = _git(directory, "rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("no git commit recorded: %s", e)
        return {}
    if not commit:
        return {}
    state = {"git_commit": commit.strip()}
    try:
        status = _git(directory, "status", "--porcelain", "--untracked-files=no")
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


def process_provenance() -> dict[str, Any]:
    """The provenance fields of this process (computed once; a dict of plain scalars, possibly empty)."""
    global _cached
    if _cached is not None:
        return dict(_cached)
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
        fields.update(_git_state(_script_directory()))
    except Exception as e:  # noqa: BLE001 - provenance never fails a save
        log.debug("no git commit recorded: %r", e)
    _cached = fields
    return dict(fields)
