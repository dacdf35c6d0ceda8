"""The on-disk format: headers, payload checks and the manifest (pure, no files)."""
import json
import math

import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from experiment_io import __version__
from experiment_io.format import codec as fmt
from experiment_io.errors import CorruptCheckpointError, ExperimentIOError, FormatVersionError, NotACheckpointError

NAME = "/runs/a/last_checkpoint.pt"


def checkpoint_payload(**header_fields):
    payload = {key: {} for key in fmt.KINDS["checkpoint"]}
    payload[fmt.HEADER_KEY] = fmt.make_header("checkpoint", **header_fields)
    return payload


# --- make_header ------------------------------------------------------------------


def test_make_header_fields():
    header = fmt.make_header("checkpoint", epochs_done=3, step=17, structure_digest="xxh3_128:ab")
    assert header == {
        "kind": "checkpoint",
        "format_version": fmt.FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": str(torch.__version__),
        "epochs_done": 3,
        "step": 17,
        "structure_digest": "xxh3_128:ab",
    }
    assert isinstance(header["format_version"], int)
    assert all(type(v) in (int, str) for v in header.values())


@pytest.mark.parametrize("kind", sorted(fmt.KINDS))
def test_make_header_every_kind_passes_check_payload(kind):
    payload = {key: None for key in fmt.KINDS[kind]}
    payload[fmt.HEADER_KEY] = fmt.make_header(kind)
    header = fmt.check_payload(payload, NAME, (kind,))
    assert header["kind"] == kind


def test_make_header_unknown_kind():
    with pytest.raises(ValueError, match="unknown payload kind 'weights'"):
        fmt.make_header("weights")


# --- check_payload ----------------------------------------------------------------


def test_check_payload_returns_header():
    payload = checkpoint_payload(step=5)
    header = fmt.check_payload(payload, NAME, ("checkpoint",))
    assert header is payload[fmt.HEADER_KEY]
    assert header["step"] == 5


@pytest.mark.parametrize("payload", [
    torch.zeros(3),
    [1, 2, 3],
    "text",
    None,
    {"model": {}},  # a dict without a header
    {fmt.HEADER_KEY: "checkpoint"},  # a header that is not a dict
    {fmt.HEADER_KEY: {"format_version": 1}},  # a header without a kind
], ids=["tensor", "list", "str", "none", "no-header", "header-not-dict", "header-no-kind"])
def test_check_payload_not_a_payload(payload):
    with pytest.raises(NotACheckpointError) as info:
        fmt.check_payload(payload, NAME, ("checkpoint",))
    assert NAME in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ExperimentIOError)


def test_check_payload_wrong_kind():
    payload = {"model": {}, fmt.HEADER_KEY: fmt.make_header("model")}
    with pytest.raises(NotACheckpointError) as info:
        fmt.check_payload(payload, NAME, ("checkpoint",))
    message = str(info.value)
    assert NAME in message and "'model'" in message and "'checkpoint'" in message


def test_check_payload_accepts_any_of_several_kinds():
    payload = {"model": {}, fmt.HEADER_KEY: fmt.make_header("model")}
    assert fmt.check_payload(payload, NAME, ("checkpoint", "model"))["kind"] == "model"


def test_check_payload_missing_entries_are_named():
    payload = checkpoint_payload()
    del payload["controller"], payload["rng"]
    with pytest.raises(NotACheckpointError) as info:
        fmt.check_payload(payload, NAME, ("checkpoint",))
    message = str(info.value)
    assert NAME in message and "'controller'" in message and "'rng'" in message
    assert "'model'" not in message


def test_check_payload_newer_format_version():
    payload = checkpoint_payload()
    payload[fmt.HEADER_KEY]["format_version"] = fmt.FORMAT_VERSION + 1
    with pytest.raises(FormatVersionError) as info:
        fmt.check_payload(payload, NAME, ("checkpoint",))
    message = str(info.value)
    assert NAME in message
    assert str(fmt.FORMAT_VERSION + 1) in message and str(fmt.FORMAT_VERSION) in message
    assert "Upgrade" in message
    assert isinstance(info.value, ValueError)


def test_check_payload_older_format_version_accepted():
    payload = checkpoint_payload()
    payload[fmt.HEADER_KEY]["format_version"] = 0
    assert fmt.check_payload(payload, NAME, ("checkpoint",))["format_version"] == 0


@pytest.mark.parametrize("version", ["1", 1.0, True, None, [1]])
def test_check_payload_non_integer_version(version):
    payload = checkpoint_payload()
    payload[fmt.HEADER_KEY]["format_version"] = version
    with pytest.raises(NotACheckpointError) as info:
        fmt.check_payload(payload, NAME, ("checkpoint",))
    assert not isinstance(info.value, FormatVersionError)
    assert NAME in str(info.value) and repr(version) in str(info.value)


# --- manifest ---------------------------------------------------------------------


FILES = {
    "last_checkpoint.pt": {"digest": "xxh3_128:00ff", "size": 1234, "epochs_done": 2, "written_at": 1.5},
    "experiment_structure.pt": {"digest": "xxh3_128:abcd", "size": 99, "kind": "structure"},
}


def test_manifest_round_trip():
    data = fmt.manifest_to_bytes(FILES, run="r1")
    assert isinstance(data, bytes)
    header, files = fmt.manifest_from_bytes(data, "m.json")
    assert files == FILES
    assert header["kind"] == "manifest"
    assert header["format_version"] == fmt.FORMAT_VERSION
    assert header["library_version"] == __version__
    assert header["run"] == "r1"


def test_manifest_golden_bytes():
    """Pin the wire format: sorted keys, one line per file record, UTF-8 JSON."""
    data = fmt.manifest_to_bytes({"b.pt": {"size": 2, "digest": "xxh3_128:02"}, "a.pt": {"size": 1, "digest": "xxh3_128:01"}})
    # the manifest's own digest: xxh3-128 of the compact, key-sorted JSON of its records and its header without it
    content = (
        '{"files":{"a.pt":{"digest":"xxh3_128:01","size":1},"b.pt":{"digest":"xxh3_128:02","size":2}},'
        f'"header":{{"format_version":{fmt.FORMAT_VERSION},"kind":"manifest","library_version":"{__version__}",'
        f'"torch_version":"{torch.__version__}"}}}}'
    )
    digest = "xxh3_128:" + xxhash.xxh3_128(content.encode("utf-8")).hexdigest()
    expected = (
        '{"files": {\n'
        ' "a.pt": {"digest": "xxh3_128:01", "size": 1},\n'
        ' "b.pt": {"digest": "xxh3_128:02", "size": 2}\n'
        ' },\n'
        f' "header": {{"digest": "{digest}", "format_version": {fmt.FORMAT_VERSION}, "kind": "manifest", '
        f'"library_version": "{__version__}", "torch_version": "{torch.__version__}"}}\n'
        '}\n'
    ).encode("utf-8")
    assert data == expected
    # the indented layout of earlier releases is the same document: it still reads, its digest still checks
    older = json.dumps(json.loads(data), sort_keys=True, indent=1).encode("utf-8")
    assert fmt.manifest_from_bytes(older, "m") == fmt.manifest_from_bytes(data, "m")


def test_manifest_bytes_do_not_depend_on_insertion_order():
    forward = {name: dict(record) for name, record in FILES.items()}
    backward = {name: dict(reversed(list(FILES[name].items()))) for name in reversed(list(FILES))}
    assert list(forward) != list(backward)
    assert fmt.manifest_to_bytes(forward, a=1, b="x") == fmt.manifest_to_bytes(backward, b="x", a=1)


@pytest.mark.parametrize("data", [
    b"",
    b"\x80\x81\xfe\xff garbage",
    b"PK\x03\x04\x00\x00",  # the start of a zip (torch.save) archive
    b"not json at all",
    b"[1, 2, 3]",
    b'{"files": {}}',
    b'{"header": {"kind": "checkpoint", "format_version": 1}, "files": {}}',
    b'{"header": {"kind": "manifest", "format_version": 1}, "files": []}',
    b'{"header": {"kind": "manifest", "format_version": 1}, "files": {"a.pt": {"size": 1}}}',
    b'{"header": {"kind": "manifest", "format_version": 1}, "files": {"a.pt": {"digest": "x", "size": "1"}}}',
    b'{"header": {"kind": "manifest", "format_version": 1}, "files": {"a.pt": "xxh3_128:00"}}',
    b'{"header": {"kind": "manifest", "format_version": "1"}, "files": {}}',
], ids=lambda d: repr(d[:24]))
def test_manifest_from_garbage(data):
    with pytest.raises(CorruptCheckpointError) as info:
        fmt.manifest_from_bytes(data, "/runs/a/experiment_manifest.json")
    assert "/runs/a/experiment_manifest.json" in str(info.value)
    assert not isinstance(info.value, FormatVersionError)


def test_manifest_newer_version():
    doc = json.loads(fmt.manifest_to_bytes(FILES))
    doc["header"]["format_version"] = fmt.FORMAT_VERSION + 7
    with pytest.raises(FormatVersionError) as info:
        fmt.manifest_from_bytes(json.dumps(doc).encode(), "m.json")
    assert "m.json" in str(info.value) and str(fmt.FORMAT_VERSION + 7) in str(info.value)


# --- properties -------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2 ** 63), max_value=2 ** 63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
_records = st.fixed_dictionaries(
    {"digest": st.text(max_size=40), "size": st.integers(min_value=0, max_value=2 ** 62)},
    optional={"epochs_done": st.integers(0, 10 ** 6), "step": st.integers(0, 10 ** 9), "written_at": st.floats(0, 2e9),
              "kind": st.sampled_from(sorted(fmt.KINDS)), "extra": _scalars},
)
_names = st.text(min_size=1, max_size=30).filter(lambda n: n not in (".", "..") and not set(n) & {"/", "\\", "\0"})
_files = st.dictionaries(_names, _records, max_size=8)
_reserved = {"kind", "format_version", "library_version", "torch_version", "files", "digest"}  # "files" is manifest_to_bytes's own parameter
_fields = st.dictionaries(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(lambda k: k not in _reserved),
    _scalars, max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(files=_files, fields=_fields)
def test_manifest_round_trip_property(files, fields):
    data = fmt.manifest_to_bytes(files, **fields)
    header, parsed = fmt.manifest_from_bytes(data, "m.json")
    assert parsed == files
    for key, value in fields.items():
        assert header[key] == value and type(header[key]) is type(value)
    assert header["kind"] == "manifest" and header["format_version"] == fmt.FORMAT_VERSION
    # determinism: the same content in another insertion order gives the same bytes
    shuffled = {name: dict(reversed(list(files[name].items()))) for name in reversed(list(files))}
    assert fmt.manifest_to_bytes(shuffled, **dict(reversed(list(fields.items())))) == data


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_manifest_from_random_bytes_never_crashes_otherwise(data):
    """Fuzz: random bytes either parse as a manifest or raise CorruptCheckpointError."""
    try:
        header, files = fmt.manifest_from_bytes(data, "m.json")
    except CorruptCheckpointError:
        return
    assert isinstance(header, dict) and isinstance(files, dict)


@settings(max_examples=100, deadline=None)
@given(doc=st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10,
))
def test_manifest_from_random_json_never_crashes_otherwise(doc):
    """Fuzz with valid JSON of any shape: never an AttributeError or KeyError."""
    data = json.dumps(doc).encode("utf-8")
    try:
        fmt.manifest_from_bytes(data, "m.json")
    except CorruptCheckpointError:
        pass


@settings(max_examples=100, deadline=None)
@given(payload=st.one_of(_scalars, st.lists(_scalars, max_size=3),
                         st.dictionaries(st.text(max_size=12), _scalars, max_size=4),
                         st.fixed_dictionaries({fmt.HEADER_KEY: st.dictionaries(st.sampled_from(["kind", "format_version"]), _scalars)})))
def test_check_payload_fuzz(payload):
    """Any plain-data object lacking the entries is refused with NotACheckpointError
    (or FormatVersionError when its header claims a newer integer version)."""
    try:
        fmt.check_payload(payload, NAME, ("checkpoint",))
    except FormatVersionError:
        version = payload[fmt.HEADER_KEY]["format_version"]
        assert type(version) is int and version > fmt.FORMAT_VERSION
        return
    except NotACheckpointError:
        return
    raise AssertionError(f"{payload!r} was accepted as a checkpoint payload")


def test_float_fields_survive_exactly():
    values = {"a.pt": {"digest": "d", "size": 0, "written_at": math.pi, "tiny": 5e-324}}
    _, files = fmt.manifest_from_bytes(fmt.manifest_to_bytes(values), "m.json")
    assert files["a.pt"]["written_at"] == math.pi and files["a.pt"]["tiny"] == 5e-324
