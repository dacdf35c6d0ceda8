"""The pickle inside a ``torch.save`` archive, and what torch's own safe unpickler calls by itself."""
from __future__ import annotations

import functools
import os
from typing import Any, Union

import torch

from experiment_io.errors import NotACheckpointError

__all__ = ["pickle_of", "torch_rebuilders", "PICKLE_MAX_BYTES"]

#: The largest pickle of a structure file that is read (a structure file holds no tensor data).
PICKLE_MAX_BYTES = 256 * 1024 * 1024


def pickle_of(source: Union[str, os.PathLike]) -> bytes:
    """The bytes of the pickle (``data.pkl``) of the ``torch.save`` archive at ``source``, read by torch's own
    archive reader (so that they are the very bytes ``torch.load`` unpickles).

    :raises NotACheckpointError: when ``source`` is not such an archive, or its pickle is larger than
        :data:`PICKLE_MAX_BYTES`.
    """
    try:
        with open(source, "rb") as f, torch.serialization._open_zipfile_reader(f) as archive:
            size = archive.get_record_size("data.pkl") if hasattr(archive, "get_record_size") else None
            if size is not None and size > PICKLE_MAX_BYTES:
                raise NotACheckpointError(f"{source}: its pickle holds {size} bytes, more than a structure file "
                                          f"ever does ({PICKLE_MAX_BYTES}); it is not read")
            return bytes(archive.get_record("data.pkl"))
    except NotACheckpointError:
        raise
    except Exception as e:  # torch's reader raises RuntimeError and others for a damaged archive
        raise NotACheckpointError(f"{source} is not a readable torch.save archive ({e!r})") from e


@functools.lru_cache(maxsize=1)
def torch_rebuilders() -> dict[str, Any]:
    """``{name: callable}`` of what ``torch.load(weights_only=True)`` admits by itself (its rebuilders of tensors,
    sizes, devices and containers)."""
    from torch import _weights_only_unpickler

    found = getattr(_weights_only_unpickler, "_get_allowed_globals", None)
    return dict(found()) if found is not None else {"torch.Size": torch.Size, "torch.device": torch.device}
