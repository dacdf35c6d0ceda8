"""The lineage's records carry a format version: written with every record, checked on every read; records
written before the version was recorded (no version) still load."""
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from experiment_io.errors import IncompatibleCheckpointError
from experiment_io.frontends.lineage import Model, metric, tree
from experiment_io.frontends.lineage.records import (BACKUP_NAME, BLOCK_NAME, PROGRESS_NAME, RECORD_VERSION,
                                                     STATE_NAME, VERSION_KEY, Records, checked)
from experiment_io.frontends.verified_loading import verified_load
from experiment_io.platform import archive
from experiment_io.storage.manifest import read_manifest


@metric("flat")
def metric_flat(outputs, targets):
    """The same value every epoch: the first epoch stays the best, so the block keeps a backup."""
    return float(targets.shape[0])


def loaders():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=generator)
    y = (x[:, 0] + x[:, 2] > 0).long()
    return (DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True),
            DataLoader(TensorDataset(x[64:], y[64:]), batch_size=32))


def new_model(root):
    torch.manual_seed(0)
    return Model("net", torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
                 root=root, quiet=True)


def block(model, epochs=2):
    with model.checkpoint(1) as cp:
        cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.Adam, optimizer_args=dict(lr=0.01))
        return cp.train(*loaders(), watch="flat", epochs=epochs, metrics=[metric_flat])


def trained(root):
    """Checkpoint 1 with a block, a state, a backup and a cached evaluation."""
    model = new_model(root)
    result = block(model)
    model.cache(1).evaluate(loaders()[1])
    return model, result


def rewrite(root, name, change):
    """Record ``name`` of checkpoint 1 written again through the library's storage, changed by ``change``."""
    directory = os.path.join(root, "net", "1")
    payload = verified_load(os.path.join(directory, name), map_location="cpu")
    change(payload)
    Records(os.path.join(root, "net")).save("1", {name: (lambda f: archive.save(payload, f), {"kind": "user"})})


def test_every_record_carries_the_version_in_its_file_and_its_manifest_record(tmp_path):
    trained(tmp_path)
    directory = tmp_path / "net" / "1"
    files = read_manifest(directory)[1]
    for name in (BLOCK_NAME, STATE_NAME, BACKUP_NAME, "cache_evaluate.pt"):
        assert files[name][VERSION_KEY] == RECORD_VERSION, name
        assert torch.load(directory / name, weights_only=True)[VERSION_KEY] == RECORD_VERSION, name


def test_records_without_a_version_load_as_version_1(tmp_path):
    """Files written before records were versioned: the same layout, no version."""
    model, expected = trained(tmp_path)
    end, evaluation = model.model.state_dict(), model.cache(1).get("evaluate")
    for name in (BLOCK_NAME, STATE_NAME, BACKUP_NAME, "cache_evaluate.pt"):
        rewrite(tmp_path, name, lambda payload: payload.pop(VERSION_KEY))
        assert VERSION_KEY not in torch.load(tmp_path / "net" / "1" / name, weights_only=True)
    again = new_model(tmp_path)
    assert block(again) == expected  # read back, not trained
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in end.items())
    assert again.cache(1).get("evaluate") == evaluation
    fresh = new_model(tmp_path)
    fresh.load_checkpoint(1, from_backup=True)
    assert "1 (1 train call, 2 epochs" in tree(tmp_path / "net")


def two_calls(root, second_metric=metric_flat):
    model = new_model(root)
    with model.checkpoint(1) as cp:
        cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.Adam, optimizer_args=dict(lr=0.01))
        first = cp.train(*loaders(), watch="flat", epochs=2, metrics=[metric_flat])
        second = cp.train(*loaders(), watch="flat", epochs=2, metrics=[second_metric])
    return model, [first, second]


def test_a_progress_save_without_a_version_is_continued(tmp_path, caplog):
    reference, expected = two_calls(tmp_path / "reference")
    with pytest.raises(KeyboardInterrupt):  # in the second call's second epoch, after its first epoch's save
        two_calls(tmp_path / "run", interrupting(6))
    rewrite(tmp_path / "run", PROGRESS_NAME, lambda payload: payload.pop(VERSION_KEY))
    model, results = two_calls(tmp_path / "run")
    assert "continuing the interrupted train() call 2 at epoch 2 of 2, batch 0" in caplog.text
    assert results == expected
    assert all(torch.equal(model.model.state_dict()[k], v) for k, v in reference.model.state_dict().items())


def interrupting(at):
    count = {"n": 0}

    @metric("flat")
    def flat(outputs, targets):
        count["n"] += 1
        if count["n"] == at:
            raise KeyboardInterrupt
        return float(targets.shape[0])
    return flat


@pytest.mark.parametrize("name", [BLOCK_NAME, STATE_NAME, BACKUP_NAME])
def test_a_newer_record_is_refused_with_what_to_do(tmp_path, name):
    trained(tmp_path)
    rewrite(tmp_path, name, lambda payload: payload.update({VERSION_KEY: RECORD_VERSION + 1}))
    with pytest.raises(IncompatibleCheckpointError, match=rf"{name} was written with lineage record format version "
                       rf"{RECORD_VERSION + 1}.*reads versions up to {RECORD_VERSION}\. Upgrade experiment_io"):
        new_model(tmp_path).load_checkpoint(1, from_backup=True)
    if name != BACKUP_NAME:
        with pytest.raises(IncompatibleCheckpointError, match="Upgrade experiment_io"):
            block(new_model(tmp_path))


def test_a_newer_cached_result_is_refused_and_the_tree_skips_a_newer_block(tmp_path, caplog):
    model, _ = trained(tmp_path)
    rewrite(tmp_path, "cache_evaluate.pt", lambda payload: payload.update({VERSION_KEY: 7}))
    with pytest.raises(IncompatibleCheckpointError, match="version 7"):
        model.cache(1).get("evaluate")
    rewrite(tmp_path, BLOCK_NAME, lambda payload: payload.update({VERSION_KEY: 7}))
    assert "(no checkpoints)" in tree(tmp_path / "net")
    assert "version 7" in caplog.text


@pytest.mark.parametrize("version", ["1", 0, True, 1.0])
def test_a_version_that_no_library_writes_is_refused(version):
    with pytest.raises(IncompatibleCheckpointError, match="not one this library wrote"):
        checked({VERSION_KEY: version, "id": "1"}, "block.pt")


def test_the_check_is_pure_and_returns_the_record_without_its_version():
    assert checked({VERSION_KEY: RECORD_VERSION, "id": "1"}, "block.pt") == {"id": "1"}
    assert checked({"id": "1"}, "block.pt") == {"id": "1"}
    with pytest.raises(IncompatibleCheckpointError, match="not a record"):
        checked([1, 2], "block.pt")
