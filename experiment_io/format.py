"""The on-disk format: pure functions between state and bytes or plain dicts.

Nothing here touches the disk. Every payload that experiment_io writes is a dict
with a header under :data:`HEADER_KEY`; the header names the payload's kind and
the format version that wrote it. The manifest is a JSON document listing every
file of a run with its digest.
"""
import json

import torch

from .version import __version__
from .errors import FormatVersionError, NotACheckpointError

__all__ = [
    "FORMAT_VERSION",
    "HEADER_KEY",
    "KINDS",
    "make_header",
    "check_payload",
    "manifest_to_bytes",
    "manifest_from_bytes",
]

#: Version of the on-disk layout. Raise it whenever a payload or the manifest
#: changes shape; readers refuse versions newer than their own and read every
#: older one.
#:
#: 1. First version.
#: 2. Structure files hold the parameters and persistent buffers of the model and
#:    of the training loss as meta tensors (no data): the state files restore them.
FORMAT_VERSION = 2

#: Key of the header entry in every payload.
HEADER_KEY = "experiment_io"

#: Kinds of payload and the entries each must hold besides the header.
KINDS = {
    "structure": ("training_modules", "controller", "database"),
    "checkpoint": ("model", "loss", "evaluator", "controller", "metric_tracker", "rng", "position"),
    "model": ("model",),
}

MANIFEST_KIND = "manifest"


def make_header(kind, **fields):
    """Build the header of a payload of the given kind.

    :param kind: one of :data:`KINDS`.
    :param fields: extra plain-data fields (epoch, step, structure digest...).
    :return: a dict of plain data.
    """
    if kind not in KINDS and kind != MANIFEST_KIND:
        raise ValueError(f"unknown payload kind {kind!r}; expected one of {sorted(KINDS)}")
    header = {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": str(torch.__version__),
    }
    header.update(fields)
    return header


def check_version(version, name):
    """Refuse a format version newer than this library's.

    :raises FormatVersionError: when ``version`` is newer than :data:`FORMAT_VERSION`.
    :raises NotACheckpointError: when ``version`` is not an integer.
    """
    if not isinstance(version, int) or isinstance(version, bool):
        raise NotACheckpointError(f"{name}: format version {version!r} is not an integer; the file is not an experiment_io checkpoint")
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{name} was written with experiment_io format version {version}, "
            f"but this installation reads versions up to {FORMAT_VERSION}. "
            "Upgrade experiment_io to load it."
        )


def check_payload(payload, name, kinds):
    """Check that a loaded object is an experiment_io payload of an expected kind.

    :param payload: the object that ``torch.load`` returned.
    :param name: the file name, for error messages.
    :param kinds: the acceptable kinds.
    :return: the payload's header.
    :raises NotACheckpointError: for anything that is not such a payload.
    :raises FormatVersionError: for a payload of a newer format.
    """
    header = payload.get(HEADER_KEY) if isinstance(payload, dict) else None
    if not isinstance(header, dict) or "kind" not in header:
        raise NotACheckpointError(
            f"{name} is not an experiment_io checkpoint (it holds a {type(payload).__name__} "
            f"without an {HEADER_KEY!r} header). Point the loader at a file written by train_model."
        )
    check_version(header.get("format_version"), name)
    if header["kind"] not in kinds:
        raise NotACheckpointError(
            f"{name} is an experiment_io {header['kind']!r} file, but a {' or '.join(repr(k) for k in kinds)} file was expected here."
        )
    missing = [key for key in KINDS[header["kind"]] if key not in payload]
    if missing:
        raise NotACheckpointError(f"{name} lacks the entries {missing} that a {header['kind']!r} file must hold; it is damaged or not written by experiment_io.")
    return header


def manifest_to_bytes(files, **fields):
    """Serialize a manifest.

    :param files: mapping of file name to its record (plain data: digest, size, ...).
    :param fields: further top-level fields.
    :return: UTF-8 JSON bytes, keys sorted so equal manifests give equal bytes.
    """
    doc = {"header": make_header(MANIFEST_KIND, **fields), "files": files}
    return json.dumps(doc, sort_keys=True, indent=1).encode("utf-8")


def manifest_from_bytes(data, name):
    """Parse manifest bytes.

    :return: ``(header, files)``.
    :raises NotACheckpointError: for bytes that are not a manifest.
    :raises FormatVersionError: for a manifest of a newer format.
    """
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise NotACheckpointError(f"{name} is not a valid experiment_io manifest (not JSON: {e}).") from e
    header = doc.get("header") if isinstance(doc, dict) else None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(header, dict) or header.get("kind") != MANIFEST_KIND or not isinstance(files, dict):
        raise NotACheckpointError(f"{name} is not an experiment_io manifest.")
    check_version(header.get("format_version"), name)
    for fname, record in files.items():
        if not isinstance(record, dict) or not isinstance(record.get("digest"), str) or not isinstance(record.get("size"), int):
            raise NotACheckpointError(f"{name}: the record of {fname!r} lacks a digest or size; the manifest is damaged.")
    return header, files
