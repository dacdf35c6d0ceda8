"""The on-disk format: pure functions between state and bytes or plain dicts.

Nothing here touches the disk. Every payload that experiment_io writes is a dict
with a header under :data:`HEADER_KEY`; the header names the payload's kind and
the format version that wrote it. A model file is written as the model's plain
``state_dict`` (since version 3): its header goes into its manifest record only
(:func:`model_from_record`). The manifest is a JSON document listing every
file of a run with its digest.
"""
import json
import math
from typing import Any, Collection, Mapping, Optional

import torch
import xxhash

from experiment_io.version import __version__
from experiment_io.errors import CorruptCheckpointError, FormatVersionError, NotACheckpointError

__all__ = [
    "FORMAT_VERSION",
    "HEADER_KEY",
    "KINDS",
    "make_header",
    "check_payload",
    "model_from_record",
    "record_fields",
    "manifest_to_bytes",
    "manifest_from_bytes",
    "PARTS_DIGEST_NAME",
    "parts_digest",
]

#: Version of the on-disk layout. Raise it whenever a payload or the manifest
#: changes shape; readers refuse versions newer than their own and read every
#: older one.
#:
#: 1. First version.
#: 2. Structure files hold the parameters and persistent buffers of the model and
#:    of the training loss as meta tensors (no data): the state files restore them.
#: 3. Model files (``best_model.pt``, ``model_epoch_N.pt``) hold the model's plain
#:    ``state_dict``, as hippynn's do (``model.load_state_dict(torch.load(path))``);
#:    their header lives only in their manifest record.
#: 4. A checkpoint's metric history is kept in the run's ``metrics.csv``, which every
#:    epoch appends to: the checkpoint's metric tracker records how far the file goes
#:    (its size and the digest of that part) instead of holding the history.
#: 5. A large file's manifest record may list its digest in parts (``"parts"``, see
#:    :mod:`experiment_io.storage.parts`); its ``digest`` is then that of the list.
FORMAT_VERSION = 5

#: Key of the header entry in every payload.
HEADER_KEY = "experiment_io"

#: Kinds of payload and the entries each must hold besides the header.
KINDS = {
    "structure": ("training_modules", "controller", "database"),
    "checkpoint": ("model", "loss", "evaluator", "controller", "metric_tracker", "rng", "position"),
    "model": ("model",),
}

MANIFEST_KIND = "manifest"


def make_header(kind: str, **fields: Any) -> dict[str, Any]:
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


def check_version(version: Any, name: str) -> None:
    """Refuse a format version newer than this library's.

    :raises FormatVersionError: when ``version`` is newer than :data:`FORMAT_VERSION`.
    :raises NotACheckpointError: when ``version`` is not an integer.
    """
    if not isinstance(version, int) or isinstance(version, bool):
        raise NotACheckpointError(f"{name}: format version {version!r} is not an integer; the file is not an "
                                  "experiment_io checkpoint")
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{name} was written with experiment_io format version {version}, "
            f"but this installation reads versions up to {FORMAT_VERSION}. "
            "Upgrade experiment_io to load it."
        )


def check_payload(payload: Any, name: str, kinds: Collection[str]) -> dict[str, Any]:
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
            f"{name} is an experiment_io {header['kind']!r} file, but a {' or '.join(repr(k) for k in kinds)} file "
            "was expected here."
        )
    missing = [key for key in KINDS[header["kind"]] if key not in payload]
    if missing:
        raise NotACheckpointError(f"{name} lacks the entries {missing} that a {header['kind']!r} file must hold; it is "
                                  "damaged or not written by experiment_io.")
    return header


def _canonical(doc):
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _manifest_digest(header, files):
    """The digest of a manifest's content: its header (without this digest) and its records."""
    body = {"header": {k: v for k, v in header.items() if k != "digest"}, "files": files}
    return "xxh3_128:" + xxhash.xxh3_128(_canonical(body)).hexdigest()


def manifest_to_bytes(files: Mapping[str, Mapping[str, Any]], **fields: Any) -> bytes:
    """Serialize a manifest, with the digest of its own content in its header.

    :param files: mapping of file name to its record (plain data: digest, size, ...).
    :param fields: further top-level fields.
    :return: UTF-8 JSON bytes, keys sorted so equal manifests give equal bytes.
    """
    header = make_header(MANIFEST_KIND, **fields)
    header["digest"] = _manifest_digest(header, files)
    # one line per file, each through json's C encoder (an indented dump runs the pure-Python one, ten times slower
    # on the manifest written at every save); a JSON reader sees the same document
    lines = [f" {_compact(name)}: {_compact(files[name])}" for name in sorted(files)]
    body = "{\n" + ",\n".join(lines) + "\n }" if lines else "{}"
    return f'{{"files": {body},\n "header": {_compact(header)}\n}}\n'.encode("utf-8")


def _compact(doc):
    return json.dumps(doc, sort_keys=True, separators=(", ", ": "))


def model_from_record(payload: Any, name: str, record: Any) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
    """A model file of format 3 or newer (a plain ``state_dict``), as a payload with the header of its record.

    :return: ``(payload, header)``, or ``None`` when ``payload`` is not such a file.
    :raises FormatVersionError: for a record of a newer format.
    """
    if (not isinstance(record, dict) or record.get("kind") != "model"
            or isinstance(payload, dict) and HEADER_KEY in payload):
        return None
    if not isinstance(record.get("format_version"), int) or record["format_version"] < 3:
        return None
    check_version(record["format_version"], name)
    if not isinstance(payload, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in payload.items()):
        raise NotACheckpointError(f"{name} is recorded as a model file, but does not hold a state_dict of tensors.")
    header = {k: v for k, v in record.items() if k not in ("digest", "size", "written_at")}
    return {HEADER_KEY: header, "model": payload}, header


#: The type each known field of a manifest record must have (other fields: plain scalars).
_RECORD_FIELDS = {
    "digest": (str,), "size": (int,), "step": (int,), "epochs_done": (int,), "samples_done": (int,),
    "world_size": (int,), "format_version": (int,), "written_at": (int, float), "kind": (str,),
    "structure_digest": (str, type(None)), "interrupted": (str, type(None)), "model_device": (str,),
    "library_version": (str,), "torch_version": (str,), "max_epochs": (int,), "best_epoch": (int, type(None)),
    "finished": (bool,), "stop_reason": (str, type(None)), "retired": (bool,), "kept": (str,), "host": (str,),
    "command": (str,), "slurm_job_id": (str,), "slurm_restart_count": (int,), "git_commit": (str,),
    "git_dirty": (bool,), "resumes": (int,), "stopping_value": (int, float, type(None)), "parts": (list,),
}
_SCALARS = (str, int, float, bool, type(None))


def record_fields(header: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a payload's header that go into its manifest record: plain scalars of the type a reader
    accepts (a field of another type, from a custom controller say, is left out rather than making the manifest
    unreadable)."""
    fields = {}
    for field, value in header.items():
        types = _RECORD_FIELDS.get(field, _SCALARS)
        if (not isinstance(value, _SCALARS) or not isinstance(value, types)
                or (isinstance(value, bool) and bool not in types)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and field in _RECORD_FIELDS and value < 0:
            continue
        fields[field] = value
    return fields


def _check_record(name, fname, record):
    if (not isinstance(fname, str) or not fname or fname in (".", "..") or "/" in fname or "\\" in fname
            or "\0" in fname):
        raise CorruptCheckpointError(f"{name}: {fname!r} is not a plain file name; the manifest is damaged or forged.")
    if not isinstance(record, dict):
        raise CorruptCheckpointError(f"{name}: the record of {fname!r} is not a JSON object; the manifest is damaged.")
    for field in ("digest", "size"):
        if field not in record:
            raise CorruptCheckpointError(f"{name}: the record of {fname!r} lacks its {field!r}; the manifest is "
                                         "damaged.")
    if "parts" in record:
        _check_parts(name, fname, record)
    for field, value in record.items():
        types = _RECORD_FIELDS.get(field, _SCALARS)
        bad = (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
               or (isinstance(value, float) and not math.isfinite(value))
               or (isinstance(value, int) and not isinstance(value, bool) and field in _RECORD_FIELDS and value < 0))
        if bad:
            raise CorruptCheckpointError(
                f"{name}: field {field!r} of the record of {fname!r} is {value!r}, which is not a valid value; "
                "the manifest is damaged or forged. Restore the run directory from a copy, or start a new run.")


#: The algorithm name of the digest of a record's list of parts (:mod:`experiment_io.storage.parts`).
PARTS_DIGEST_NAME = "xxh3_128-parts"


def parts_digest(parts: Any) -> str:
    """The digest of a file's parts (``(size, xxh3-128 hex)`` each, in file order), as its record's ``digest``."""
    listed = ";".join(f"{size}:{digest}" for size, digest in parts)
    return f"{PARTS_DIGEST_NAME}:{xxhash.xxh3_128(listed.encode()).hexdigest()}"


def _check_parts(name, fname, record):
    parts = record["parts"]
    well_formed = isinstance(parts, list) and len(parts) > 1 and all(
        isinstance(part, list) and len(part) == 2 and isinstance(part[0], int) and not isinstance(part[0], bool)
        and part[0] > 0 and isinstance(part[1], str) and len(part[1]) == 32 for part in parts)
    if not (well_formed and sum(size for size, _ in parts) == record.get("size")
            and record.get("digest") == parts_digest(parts)):
        raise CorruptCheckpointError(f"{name}: the parts of the record of {fname!r} do not add up to its size and "
                                     "digest; the manifest is damaged or forged. Restore the run directory from a "
                                     "copy, or start a new run.")


def manifest_from_bytes(data: bytes, name: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Parse and validate manifest bytes.

    Every record must name a plain file and hold fields of the expected types; a
    manifest that carries the digest of its own content must match it.

    :return: ``(header, files)``.
    :raises CorruptCheckpointError: for bytes that are not a valid manifest, naming the field.
    :raises FormatVersionError: for a manifest of a newer format.
    """
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{name} is not a valid experiment_io manifest (not JSON: {e}).") from e
    header = doc.get("header") if isinstance(doc, dict) else None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(header, dict) or header.get("kind") != MANIFEST_KIND or not isinstance(files, dict):
        raise CorruptCheckpointError(f"{name} is not an experiment_io manifest.")
    try:
        check_version(header.get("format_version"), name)
    except FormatVersionError:
        raise
    except NotACheckpointError as e:
        raise CorruptCheckpointError(str(e)) from e
    for fname, record in files.items():
        _check_record(name, fname, record)
    digest = header.get("digest")
    if digest is not None and digest != _manifest_digest(header, files):
        raise CorruptCheckpointError(
            f"{name} does not match the digest of its own content ({digest}): it was changed after it was written. "
            "Nothing in the run can be trusted to be what it records; restore the directory from a copy.")
    return header, files
