"""What a model's components hold: the state a checkpoint block may continue from, or why none may.

A block records its parent, the checkpoint whose end state the model held when the
block began; it can do so only while the components hold a state that some
checkpoint holds. :class:`Holding` says which state that is; :func:`parent_of`
decides, when a block is entered, what it continues from.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

from experiment_io.errors import IncompatibleCheckpointError

if TYPE_CHECKING:
    from experiment_io.frontends.lineage.model import Model

__all__ = ["Held", "Holding", "parent_of", "load_arguments"]


class Held(enum.Enum):
    """The kinds of state a model's components hold."""

    #: as the user's code built them (no checkpoint)
    BUILT = "built"
    #: the end state of a checkpoint (``Model.current``), loaded the way ``Model.current_token`` names
    CHECKPOINT = "checkpoint"
    #: what a block left before it ended: set up, or trained in part (:attr:`Holding.block`)
    MIDWAY = "midway"
    #: the state of a checkpoint deleted since (:attr:`Holding.block`; ``None`` when the model's were all deleted)
    DELETED = "deleted"


@dataclass(frozen=True)
class Holding:
    """What a model's components hold.

    :ivar held: a :class:`Held`.
    :ivar block: the checkpoint a :attr:`Held.MIDWAY` or :attr:`Held.DELETED` state is of.
    """

    held: Held
    block: Optional[str] = None

    @classmethod
    def midway(cls, cp_id: str) -> "Holding":
        """What block ``cp_id`` left before it ended."""
        return cls(Held.MIDWAY, cp_id)

    @classmethod
    def deleted(cls, cp_id: Optional[str]) -> "Holding":
        """The state of checkpoint ``cp_id``, deleted since (``None``: of one of the model's deleted checkpoints)."""
        return cls(Held.DELETED, cp_id)

    def midway_in(self, cp_id: str) -> bool:
        """Whether this is what block ``cp_id`` left before it ended."""
        return self.held is Held.MIDWAY and self.block == cp_id

    @property
    def can_be_a_parent(self) -> bool:
        """Whether a block may start from this state: a checkpoint's end state, or the model as built."""
        return self.held in (Held.BUILT, Held.CHECKPOINT)

    def describe(self) -> str:
        """Whose state this is, in words: ``checkpoint 2``, ``deleted checkpoint 3``, ``a deleted checkpoint``."""
        if self.held is Held.MIDWAY:
            return f"checkpoint {self.block}"
        if self.held is Held.DELETED:
            return f"deleted checkpoint {self.block}" if self.block is not None else "a deleted checkpoint"
        return self.held.value


BUILT = Holding(Held.BUILT)


def load_arguments(record: Mapping[str, Any]) -> str:
    """The arguments of the ``load_checkpoint`` that gives a block's parent as the block began from it."""
    token = record.get("parent_token") or ""
    return repr(record["parent"]) + (", from_backup=True" if "+backup" in token else "") + (
        ", load_schedulers=False" if "+fresh-schedulers" in token else "")


def parent_of(model: "Model", record: Optional[Mapping[str, Any]], cp_id: str, where: str
              ) -> tuple[Optional[str], Optional[str]]:
    """The parent of block ``cp_id`` and the token of its end state, as the block is entered now.

    :param record: the block's record on disk (``None`` for a new block).
    :raises IncompatibleCheckpointError: when the model holds a state no checkpoint holds, or another state than
        the one the block continued from when it was first run; the message names the fix.
    """
    holding = model.holding
    midway = holding.midway_in(cp_id)
    if (record is not None and model.current == cp_id and model.current_token == record["token"]
            and (holding.held is Held.CHECKPOINT or midway)):
        # the same cell again (finished, or interrupted in a call it added)
        return record["parent"], record.get("parent_token")
    if not holding.can_be_a_parent and not midway:
        holder = holding.describe()
        interrupted = holding.held is Held.MIDWAY
        raise IncompatibleCheckpointError(
            f"the model holds the state that {holder} "
            + ("left when it was interrupted" if interrupted else "left")
            + f", which no checkpoint holds, so {where} cannot record what it continues from. "
            + (f"Run {holder}'s block again to finish it, load" if interrupted else "Load")
            + " a checkpoint (model.load_checkpoint(id)), or build the model again (re-run the cell that "
            "creates it).")
    parent = model.current
    if record is not None and record["parent"] != parent:
        load = (f"load its parent first (model.load_checkpoint({load_arguments(record)}))"
                if record["parent"] is not None else "build the model again (re-run the cell that creates it)")
        raise IncompatibleCheckpointError(
            f"{where} continued from "
            + ("the model as built" if record["parent"] is None else f"checkpoint {record['parent']}")
            + f", but the model now stands at {'no checkpoint' if parent is None else 'checkpoint ' + parent}. "
            f"To read it back, {load}; to train it from here, delete it: {model.deletion_hint(cp_id)}")
    if record is not None and record.get("parent_token") != model.current_token:
        raise IncompatibleCheckpointError(
            f"{where} continued from another state of checkpoint {parent}: that checkpoint was trained "
            f"again or extended since, or it is loaded another way now (from_backup=, load_schedulers=). "
            f"Delete {where} to train it from the state the model stands at: {model.deletion_hint(cp_id)}")
    return parent, model.current_token
