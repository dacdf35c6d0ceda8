"""The checkpoints of a model as a tree of forks, read from the files alone (``experiment-io lineage DIR``)."""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from experiment_io.frontends.lineage.records import BLOCK_NAME, Records, cached_names

__all__ = ["blocks", "tree"]

log = logging.getLogger(__name__)


def blocks(directory: "str | os.PathLike") -> list[dict[str, Any]]:
    """The block records of the checkpoints under a model directory, oldest first, each with the names of its
    cached results under ``"cached"`` (a checkpoint that cannot be read is logged and left out)."""
    records = Records(os.fspath(directory))
    entries = []
    for cp_id in records.on_disk():
        try:
            files = records.manifest(cp_id)
            if BLOCK_NAME not in files:
                continue
            record = records.read(cp_id, BLOCK_NAME)
        except Exception as e:  # a damaged checkpoint is shown, not fatal to the listing
            log.warning("checkpoint directory %s cannot be read: %s", records.path(cp_id), e)
            continue
        record["cached"] = cached_names(files)
        entries.append(record)
    entries.sort(key=lambda r: (r.get("created", 0), r["id"]))
    return entries


def _label(record):
    results = record["results"]
    parts = []
    if results:
        epochs = sum(len(r["result"]["history"]["epoch"]) for r in results)
        last = results[-1]["result"]
        parts.append(f"{len(results)} train call{'s' if len(results) > 1 else ''}, {epochs} epochs to epoch "
                     f"{record.get('epoch')}, best {last['watch']} {last['best_value']:.4g} "
                     f"at epoch {last['best_epoch']}")
    else:
        parts.append("no training")
    if record.get("cached"):
        parts.append("cached: " + ", ".join(record["cached"]))
    if not record["complete"]:
        parts.append("UNFINISHED")
    text = f"{record['id']}"
    if record.get("description"):
        text += f" \"{record['description']}\""
    return text + " (" + "; ".join(parts) + ")"


def tree(directory: "str | os.PathLike", title: Optional[str] = None) -> str:
    """The checkpoints of a model directory (``<root>/<model id>``) as a tree of forks."""
    directory = os.fspath(directory)
    records = blocks(directory)
    ids = {r["id"] for r in records}
    children: dict[Optional[str], list[dict]] = {}
    for record in records:
        parent = record["parent"] if record["parent"] in ids else None
        children.setdefault(parent, []).append(record)
    if title is None:
        described = [r.get("model_description") for r in records if r.get("model_description")]
        title = os.path.basename(os.path.abspath(directory)) + (f": {described[-1]}" if described else "")
    lines = [title]
    if not records:
        lines.append("  (no checkpoints)")

    def walk(record, prefix, last):
        lines.append(prefix + ("└── " if last else "├── ") + _label(record)
                     + (f" [parent {record['parent']} deleted]" if record["parent"] is not None
                        and record["parent"] not in ids else ""))
        kids = children.get(record["id"], [])
        for i, kid in enumerate(kids):
            walk(kid, prefix + ("    " if last else "│   "), i == len(kids) - 1)
    roots = children.get(None, [])
    for i, record in enumerate(roots):
        walk(record, "", i == len(roots) - 1)
    return "\n".join(lines)
