"""How the command line says things: a file's record in words, and names made safe to print.

A run directory may come from anyone: every name, path and message taken from it
goes through :func:`shown` before it reaches the terminal, so that a file name
holding a newline cannot forge a line of the output, nor an escape sequence
rewrite the screen.
"""
import datetime
from typing import Any, Optional

from experiment_io.run.payloads import LAST_NAME

__all__ = ["shown", "when", "what", "held", "epoch_of_record", "provenance_line", "EPOCH_LEGEND"]

#: The line that says how ``info`` and ``list`` count epochs.
EPOCH_LEGEND = ("epochs are numbered from 0: 'epoch' is the epoch a file's state is from, 'done' the epochs finished "
                "when it was written (a file written after epoch 2 has 3 done)")


def shown(text: Any) -> str:
    """``text`` as one printable line: control characters (newlines, escapes) and other unprintable ones are
    written as Python escapes (``\\n``, ``\\x1b``)."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def when(record: dict) -> str:
    """When a file was written (local time), or ``"?"``."""
    try:
        return datetime.datetime.fromtimestamp(record["written_at"]).strftime("%Y-%m-%d %H:%M:%S")
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        return "?"


def what(record: dict) -> str:
    """What a file holds, in words: the epoch its state is from, and why a retention keeps it."""
    if record.get("retired") is True:
        return "being removed (no longer kept by the retention)"
    holds = held(record)
    return f"{holds}; kept: {record['kept']}" if record.get("kept") else holds


def held(record: dict) -> str:
    """The epoch (or the place in an epoch) a file's state is from, in words."""
    done, kind = record.get("epochs_done"), record.get("kind")
    if kind == "structure" or done is None:
        return ""
    if record.get("samples_done"):
        why = f", stopped by {record['interrupted']}" if record.get("interrupted") else ""
        return f"in epoch {done} ({record['samples_done']} samples){why}"
    if done == 0:
        return "before the first epoch" + (f", stopped by {record['interrupted']}" if record.get("interrupted") else "")
    return f"{'model' if kind == 'model' else 'state'} after epoch {done - 1}"


def provenance_line(record: Any) -> list[str]:
    """Where the newest checkpoint was written (host, SLURM job, git commit, resumes; command), as lines to print."""
    if not isinstance(record, dict):
        return []
    parts = []
    if record.get("host"):
        parts.append(f"host {record['host']}")
    if record.get("slurm_job_id"):
        restarts = record.get("slurm_restart_count")
        parts.append(f"SLURM job {record['slurm_job_id']}" + (f" (restart {restarts})" if restarts else ""))
    if "world_size" in record:
        parts.append(f"{record['world_size']} rank(s)")
    if "resumes" in record:
        parts.append(f"resumed {record['resumes']} time(s)")
    if record.get("git_commit"):
        dirty = " with uncommitted changes" if record.get("git_dirty") else ""
        parts.append(f"git commit {str(record['git_commit'])[:12]}{dirty}")
    versions = [f"{name} {record[key]}"
                for name, key in (("experiment_io", "library_version"), ("torch", "torch_version")) if record.get(key)]
    lines = [f"{LAST_NAME} written by: " + shown(", ".join(parts + versions))] if parts or versions else []
    if record.get("command"):
        lines.append(f"command: {shown(record['command'])}")
    return lines


def epoch_of_record(record: Optional[dict]) -> Any:
    """The 0-based epoch a file's state is from ('' when it is not from the end of an epoch)."""
    if not record or record.get("samples_done") or not isinstance(record.get("epochs_done"), int):
        return ""
    return record["epochs_done"] - 1 if record["epochs_done"] > 0 else ""
