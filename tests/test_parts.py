"""Large files verified in parts: every byte before it is handed over, the frame before anything is read,
a tensor's parts where the load maps it, only what a partial load hands over.
"""
import json
import logging
import os
import warnings

import pytest
import torch

from experiment_io import Evaluator, SetupParams, TrainingModules, setup_training, train_model
from experiment_io.errors import CorruptCheckpointError
from experiment_io.frontends.cli import main as cli_main
from experiment_io.loading.loaders import load_checkpoint_from_cwd, load_model_from_cwd
from experiment_io.platform.residence import tensors_in
from experiment_io.run.payloads import BEST_MODEL_NAME, LAST_NAME
from experiment_io.storage import parts
from experiment_io.storage.manifest import MANIFEST_NAME, read_manifest

from helpers import flip_bit, make_database, rewrite_manifest


class WideNet(torch.nn.Module):
    """A model whose middle weight (1100 x 1000 float32, 4.4 MB) is a large tensor: its data is a part of its own."""

    def __init__(self):
        super().__init__()
        self.first, self.middle, self.last = torch.nn.Linear(3, 1100), torch.nn.Linear(1100, 1000), torch.nn.Linear(
            1000, 1)

    def forward(self, x):
        return self.last(torch.tanh(self.middle(torch.tanh(self.first(x)))))


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    model = WideNet()
    modules = TrainingModules(model, torch.nn.MSELoss(), Evaluator(model, {"mse": torch.nn.MSELoss()}, batch_size=64))
    modules, controller, tracker = setup_training(modules, SetupParams(stopping_key="mse", batch_size=50,
                                                                       max_epochs=2))
    train_model(modules, make_database(n=100), controller, tracker, None, None, quiet=True, directory=str(directory))
    return directory


@pytest.fixture
def run_copy(wide_run, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    for name in os.listdir(wide_run):
        if os.path.isfile(wide_run / name):
            (copy / name).write_bytes((wide_run / name).read_bytes())
    return copy


def _records(directory):
    return json.loads((directory / MANIFEST_NAME).read_text())["files"]


def _offset_of(path, select):
    """The offset in the file of the data of the tensor that ``select(payload)`` gives (through torch's map)."""
    payload = torch.load(path, mmap=True, weights_only=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        spans, _ = parts.storage_spans(fd)
    finally:
        os.close(fd)
    storages = sorted({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                       for t in tensors_in(payload)}.items())
    large = [pointer for pointer, size in storages if size >= parts.PART_AT_LEAST]
    distance = large[0] - spans[0][0]
    return select(payload).untyped_storage().data_ptr() - distance


def test_large_files_are_recorded_in_parts_that_cover_them(wide_run):
    records = _records(wide_run)
    for name in (BEST_MODEL_NAME, LAST_NAME):
        record = records[name]
        assert len(record["parts"]) > 1 and record["digest"].startswith("xxh3_128-parts:")
        assert sum(size for size, _ in record["parts"]) == record["size"] == os.path.getsize(wide_run / name)
    fd = os.open(wide_run / BEST_MODEL_NAME, os.O_RDONLY)
    try:
        spans, start = parts.storage_spans(fd)
    finally:
        os.close(fd)
    frame, data = parts.split_frame(parts.record_parts(records[BEST_MODEL_NAME]), spans, start)
    assert len(spans) == 1 and data and frame  # the middle weight's data, and everything else
    assert all(offset + size <= start for (offset, size, _), _ in data)


def test_a_model_loads_through_its_map_with_its_tensor_parts_verified_there(run_copy, monkeypatch):
    verified_in_file = []
    real = parts.verify_parts

    def watched(fd, some):
        verified_in_file.extend(some)
        return real(fd, some)

    monkeypatch.setattr("experiment_io.storage.verification.verify_parts", watched)
    model = load_model_from_cwd(directory=str(run_copy), mmap=True, allow=[WideNet])
    expected = torch.load(run_copy / BEST_MODEL_NAME, weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    sizes = {size for _, size, _ in verified_in_file}
    assert verified_in_file and max(sizes) < parts.PART_AT_LEAST  # the tensor's part was verified in the map


def test_a_damaged_tensor_part_is_found_after_the_map_and_the_load_falls_back(run_copy, caplog):
    flip_bit(run_copy / BEST_MODEL_NAME, _offset_of(run_copy / BEST_MODEL_NAME, lambda p: p["middle.weight"]) + 999)
    with pytest.raises(CorruptCheckpointError, match="part of bytes"):
        load_model_from_cwd(directory=str(run_copy), mmap=True, allow=[WideNet], strict=True)
    with caplog.at_level(logging.WARNING):
        model = load_model_from_cwd(directory=str(run_copy), mmap=True, allow=[WideNet])
    # the best model state that last_checkpoint.pt carries (both are of the best epoch)
    best = torch.load(run_copy / LAST_NAME, weights_only=True)["metric_tracker"]["best_model_state"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best.items())
    assert "does not match its digest" in caplog.text


def test_a_partial_load_verifies_only_what_it_hands_over(run_copy):
    # a bit of the optimizer's state is damaged: the model as of the checkpoint still loads; a resume does not
    path = run_copy / LAST_NAME
    offset = _offset_of(path, lambda p: next(
        s["exp_avg"] for s in p["controller"]["optimizer"]["state"].values() if s["exp_avg"].numel() == 1100 * 1000))
    flip_bit(path, offset + 5)
    model = load_model_from_cwd(directory=str(run_copy), which="last", mmap=True, allow=[WideNet])
    state = torch.load(path, weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint_from_cwd(directory=str(run_copy), database=make_database(n=100), strict=True)


def test_a_damaged_model_part_is_found_by_a_partial_load(run_copy):
    path = run_copy / LAST_NAME
    flip_bit(path, _offset_of(path, lambda p: p["model"]["middle.weight"]) + 12345)
    with pytest.raises(CorruptCheckpointError, match="part of bytes"):
        load_model_from_cwd(directory=str(run_copy), which="last", mmap=True, allow=[WideNet], strict=True)


def test_a_damaged_frame_is_refused_before_torch_reads_the_file(run_copy, monkeypatch):
    path = run_copy / BEST_MODEL_NAME
    with open(path, "rb") as f:
        data = f.read()
    flip_bit(path, data.index(b"middle.weight"))  # in the pickle
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(str(f)) or real(f, *a, **k))
    with pytest.raises(CorruptCheckpointError, match="part of bytes 0 to"):
        load_model_from_cwd(directory=str(run_copy), mmap=True, allow=[WideNet], strict=True, which="best")
    assert not any(BEST_MODEL_NAME in f for f in loads)


def test_verify_reads_every_part(run_copy, capsys):
    path = run_copy / BEST_MODEL_NAME
    flip_bit(path, _offset_of(path, lambda p: p["middle.weight"]) + 77)
    status = cli_main(["verify", str(run_copy)])
    out = capsys.readouterr().out
    assert status != 0
    damaged = [line for line in out.splitlines() if line.startswith("DAMAGED")]
    assert any(BEST_MODEL_NAME in line and "part of bytes" in line for line in damaged), out


@pytest.mark.parametrize("forge", ["size", "digest", "one part"])
def test_forged_parts_make_the_manifest_unreadable(run_copy, forge):
    def edit(files):
        record = files[BEST_MODEL_NAME]
        if forge == "size":
            record["parts"][0][0] += 1
        elif forge == "digest":
            record["parts"][-1][1] = "0" * 32
        else:
            record["parts"] = record["parts"][:1]

    rewrite_manifest(run_copy, edit)
    with pytest.raises(CorruptCheckpointError, match="parts of the record"):
        read_manifest(run_copy)


def test_a_damaged_zip_directory_makes_the_load_fall_back(run_copy):
    """Where the parts lie is read from the zip directory before the directory is verified: a directory whose
    offsets point anywhere (here before the file's start) leaves the file to be verified whole, and it fails."""
    path = run_copy / BEST_MODEL_NAME
    data = bytearray(path.read_bytes())
    for signature, field in ((b"PK\x06\x06", 48), (b"PK\x05\x06", 16)):  # zip64 end record, end record
        at = data.rfind(signature)
        if at >= 0:
            width = 8 if signature == b"PK\x06\x06" else 4
            data[at + field:at + field + width] = (len(data) * 3).to_bytes(width, "little")
    path.write_bytes(bytes(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert parts.storage_spans(fd) is None
    finally:
        os.close(fd)
    with pytest.raises(CorruptCheckpointError):
        load_model_from_cwd(directory=str(run_copy), mmap=True, allow=[WideNet], strict=True)
    model = load_model_from_cwd(directory=str(run_copy), mmap=True, allow=[WideNet])
    best = torch.load(run_copy / LAST_NAME, weights_only=True)["metric_tracker"]["best_model_state"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in best.items())


def test_tensors_without_a_storage_of_their_own_are_left_to_the_file():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CSR support is "beta"
        csr = torch.eye(4).to_sparse_csr()
    assert parts._storages([csr, torch.zeros(0)]) == {}


def test_an_interrupted_verification_waits_for_its_helpers(monkeypatch):
    """A helper may be reading the map the caller frees once it gives up: the caller waits for every helper, and
    the helpers take no new part, before the interrupt goes on."""
    import threading
    import time

    from experiment_io.platform import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 3)
    running, finished, lock = [0], [], threading.Lock()

    def work(item):
        if threading.current_thread() is threading.main_thread():
            time.sleep(0.05)  # the helpers are in the middle of their first parts
            raise KeyboardInterrupt
        with lock:
            running[0] += 1
        time.sleep(0.2)
        with lock:
            running[0] -= 1
            finished.append(item)

    with pytest.raises(KeyboardInterrupt):
        threads.on_every_core(work, range(40))
    assert running[0] == 0 and 0 < len(finished) < 39
