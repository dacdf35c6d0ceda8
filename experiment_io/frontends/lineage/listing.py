"""The checkpoints of a model as a tree of forks, read from the files alone (``experiment-io lineage DIR``).

The records come from a directory that may come from anyone: each is checked
field by field and a record that does not hold what the library writes is left
out with a warning (never an exception of its own), a record's id is its folder's
name whatever the record claims, and the tree is walked without recursion, so that
a chain of thousands of parents or a loop of parents is shown, not followed.
"""
from __future__ import annotations

import collections
import logging
import math
import os
from typing import Any, Optional

from experiment_io.frontends.describe import shown
from experiment_io.frontends.lineage.records import BLOCK_NAME, Records, cached_names

__all__ = ["blocks", "tree", "descendants"]

log = logging.getLogger(__name__)


def _text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _summary(cp_id: str, record: Any) -> dict[str, Any]:
    """What the listing shows of a block record, each field checked.

    :raises ValueError: for a record that is not the library's.
    """
    if not isinstance(record, dict) or not isinstance(record.get("results"), list):
        raise ValueError("not a block record (no list of results)")
    calls = []
    for entry in record["results"]:
        result = entry.get("result") if isinstance(entry, dict) else None
        history = result.get("history") if isinstance(result, dict) else None
        epochs = history.get("epoch") if isinstance(history, dict) else None
        if not isinstance(result, dict) or not isinstance(epochs, list):
            raise ValueError("a train() result without its epochs")
        calls.append({"epochs": len(epochs), "watch": _text(result.get("watch")) or "?",
                      "best_value": _number(result.get("best_value")), "best_epoch": result.get("best_epoch")})
    if record.get("id") != cp_id:
        log.warning("the block record in folder %s names itself %r: shown as %s", cp_id, record.get("id"), cp_id)
    parent = record.get("parent")
    return {"id": cp_id, "parent": parent if isinstance(parent, str) else None, "calls": calls,
            "epoch": record.get("epoch") if isinstance(record.get("epoch"), int) else None,
            "complete": record.get("complete") is True, "created": _number(record.get("created")) or 0.0,
            "description": _text(record.get("description")),
            "model_description": _text(record.get("model_description"))}


def blocks(directory: "str | os.PathLike") -> list[dict[str, Any]]:
    """What the block records of the checkpoints under a model directory say, oldest first: ``id``, ``parent``,
    ``calls`` (per ``train()`` call its epochs, watched metric and best value), ``epoch``, ``complete``,
    ``created``, ``description``, ``model_description`` and ``cached`` (the names of its cached results).

    A checkpoint whose record cannot be read, or does not hold what the library writes, is logged and left out.
    """
    records = Records(os.fspath(directory))
    entries = []
    for cp_id in records.on_disk():
        try:
            files = records.manifest(cp_id)
            if BLOCK_NAME not in files:
                continue
            entry = _summary(cp_id, records.read(cp_id, BLOCK_NAME))
        except Exception as e:  # a damaged or forged checkpoint is reported, not fatal to the listing
            log.warning("checkpoint directory %s cannot be read: %s", records.path(cp_id), e)
            continue
        entry["cached"] = cached_names(files)
        entries.append(entry)
    entries.sort(key=lambda r: (r["created"], r["id"]))
    return entries


def _label(record):
    calls = record["calls"]
    parts = []
    if calls:
        last = calls[-1]
        best = f"{last['best_value']:.4g}" if last["best_value"] is not None and math.isfinite(last["best_value"]) \
            else "?"
        parts.append(f"{len(calls)} train call{'s' if len(calls) > 1 else ''}, {sum(c['epochs'] for c in calls)} "
                     f"epochs to epoch {record['epoch']}, best {shown(last['watch'])} {best} at epoch "
                     f"{shown(last['best_epoch'])}")
    else:
        parts.append("no training")
    if record["cached"]:
        parts.append("cached: " + ", ".join(shown(name) for name in record["cached"]))
    if not record["complete"]:
        parts.append("UNFINISHED")
    text = shown(record["id"])
    if record["description"]:
        text += f" \"{shown(record['description'])}\""
    return text + " (" + "; ".join(parts) + ")"


def _children(records):
    """``{parent id or None: [records]}``: a record whose parent is not listed is a root."""
    ids = {r["id"] for r in records}
    children: dict[Optional[str], list[dict]] = {}
    for record in records:
        children.setdefault(record["parent"] if record["parent"] in ids else None, []).append(record)
    return children


def descendants(directory: "str | os.PathLike", cp_id: str) -> list[str]:
    """The ids of the checkpoints that continued from ``cp_id``, directly or through others (nearest first); found
    by the parent each record names, also where ``cp_id`` itself or a checkpoint between cannot be read."""
    children: dict[Optional[str], list[dict]] = {}
    for record in blocks(directory):
        children.setdefault(record["parent"], []).append(record)
    found, queue, seen = [], collections.deque([cp_id]), {cp_id}
    while queue:
        for child in children.get(queue.popleft(), []):
            if child["id"] not in seen:
                seen.add(child["id"])
                found.append(child["id"])
                queue.append(child["id"])
    return found


def tree(directory: "str | os.PathLike", title: Optional[str] = None) -> str:
    """The checkpoints of a model directory (``<root>/<model id>``) as a tree of forks."""
    directory = os.fspath(directory)
    records = blocks(directory)
    ids = {r["id"] for r in records}
    children = _children(records)
    if title is None:
        described = [r["model_description"] for r in records if r["model_description"]]
        title = os.path.basename(os.path.abspath(directory)) + (f": {described[-1]}" if described else "")
    title = shown(title)
    lines = [title]
    if not records:
        lines.append("  (no checkpoints)")
    done: set[str] = set()
    roots = list(children.get(None, []))
    # records on a loop of parents are reached from no root: each loop is shown from its oldest record
    root_ids = {r["id"] for r in roots}
    unreached = [r for r in records if r["id"] not in root_ids]
    stack = [(record, "", i == len(roots) - 1, "") for i, record in reversed(list(enumerate(roots)))]
    while stack or unreached:
        if not stack:
            record = unreached.pop(0)
            if record["id"] in done:
                continue
            stack.append((record, "", True, f" [its parents loop back to {shown(record['parent'])}]"))
        record, prefix, last, note = stack.pop()
        if record["id"] in done:
            continue
        done.add(record["id"])
        if not note and record["parent"] is not None and record["parent"] not in ids:
            note = f" [parent {shown(record['parent'])} deleted]"
        lines.append(prefix + ("└── " if last else "├── ") + _label(record) + note)
        kids = [k for k in children.get(record["id"], []) if k["id"] not in done]
        for i, kid in reversed(list(enumerate(kids))):
            stack.append((kid, prefix + ("    " if last else "│   "), i == len(kids) - 1, ""))
    return "\n".join(lines)
