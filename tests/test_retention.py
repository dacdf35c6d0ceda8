"""Retention of epoch files: the rules, what train_model keeps, and that a crash during a removal loses nothing."""
import json
import os
import subprocess
import sys

import pytest
import torch

from experiment_io import Retention, SetupParams, load_checkpoint_from_cwd, setup_training, train_model
from experiment_io.storage import atomic as storage
from experiment_io.errors import SetupError
from experiment_io.training.retention import epoch_of
from experiment_io.storage.manifest import MANIFEST_NAME, PREVIOUS_MANIFEST_NAME

from helpers import fork_child, make_database, make_training_modules

torch.set_num_threads(1)


# --- the rules --------------------------------------------------------------------------------


def test_each_rule_and_their_union():
    values = {0: 5.0, 1: 1.0, 2: 3.0, 3: 0.5, 4: 4.0, 5: 2.0}
    assert Retention(last=2).reasons(values, values) == {4: ["last 2"], 5: ["last 2"]}
    assert Retention(best=2).reasons(values, values) == {1: ["best 2"], 3: ["best 2"]}
    assert Retention(best=2).reasons(values, values, larger_is_better=True) == {0: ["best 2"], 4: ["best 2"]}
    assert Retention(every=3).reasons(values, values) == {2: ["every 3"], 5: ["every 3"]}
    both = Retention(last=1, best=1, every=3).reasons(values, values)
    assert both == {2: ["every 3"], 3: ["best 1"], 5: ["last 1", "every 3"]}
    assert Retention().reasons(values, values) == {}


def test_ties_keep_the_earlier_epoch_and_epochs_without_a_value_are_never_best():
    values = {0: 1.0, 1: 1.0, 2: float("nan")}
    assert Retention(best=1).reasons([0, 1, 2, 3], values) == {0: ["best 1"]}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_a_rule_must_be_a_positive_integer(bad):
    with pytest.raises(SetupError, match="positive integer"):
        Retention(last=bad)


def test_train_model_refuses_what_is_not_a_retention(tmp_path):
    tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=32, max_epochs=1))
    with pytest.raises(SetupError, match="Retention"):
        train_model(tm, make_database(), controller, tracker, None, None, quiet=True, directory=str(tmp_path),
                    retention={"last": 2})


def test_epoch_of_reads_both_generations_of_epoch_files_only():
    assert epoch_of("checkpoint_epoch_12.pt") == 12 and epoch_of("model_epoch_3.prev.pt") == 3
    assert epoch_of("last_checkpoint.pt") is None and epoch_of("checkpoint_epoch_x.pt") is None


# --- train_model --------------------------------------------------------------------------------


def train(directory, epochs, retention, **kwargs):
    tm, controller, tracker = setup_training(make_training_modules(),
                                             SetupParams(stopping_key="mse", batch_size=32, max_epochs=epochs))
    train_model(tm, make_database(), controller, tracker, None, None, quiet=True, directory=str(directory),
                retention=retention, plots=False, evaluate_best=False, **kwargs)
    return tracker


def manifest(directory):
    return json.loads((directory / MANIFEST_NAME).read_text())["files"]


def epoch_files_on_disk(directory):
    return sorted(n for n in os.listdir(directory) if epoch_of(n) is not None)


def assert_every_file_recorded_and_every_live_record_present(directory):
    records = manifest(directory)
    on_disk = {n for n in os.listdir(directory) if not n.startswith(".")} - {MANIFEST_NAME, PREVIOUS_MANIFEST_NAME, "experiment_io.storage.lock"}
    assert on_disk <= set(records), f"files the manifest does not know: {on_disk - set(records)}"
    live = {n for n, r in records.items() if not r.get("retired")}
    assert live <= on_disk, f"records without their file: {live - on_disk}"


def test_train_model_keeps_what_the_retention_keeps_and_removes_the_rest(tmp_path):
    tracker = train(tmp_path, 12, Retention(last=2, best=2, every=5))
    values = tracker.stopping_values()
    expected_epochs = set(Retention(last=2, best=2, every=5).reasons(range(12), values))
    assert expected_epochs >= {4, 9, 10, 11}
    expected = sorted(f"{kind}_epoch_{e}.pt" for e in expected_epochs for kind in ("checkpoint", "model"))
    assert epoch_files_on_disk(tmp_path) == expected
    records = manifest(tmp_path)
    assert sorted(n for n in records if epoch_of(n) is not None) == expected  # no record of a removed file
    assert not any(r.get("retired") for r in records.values())
    assert records["checkpoint_epoch_4.pt"]["kept"] == "every 5"
    assert "last 2" in records["model_epoch_11.pt"]["kept"]
    assert_every_file_recorded_and_every_live_record_present(tmp_path)
    # the kept epoch files are the states of their epochs
    state = torch.load(tmp_path / "checkpoint_epoch_9.pt", weights_only=True)
    assert state["experiment_io"]["epochs_done"] == 10


def test_best_k_keeps_an_epoch_that_was_never_the_best_at_its_time(tmp_path):
    tracker = train(tmp_path, 6, Retention(best=3))
    values = tracker.stopping_values()
    kept = {epoch_of(n) for n in epoch_files_on_disk(tmp_path)}
    assert kept == set(sorted(values, key=values.get)[:3])


def test_retention_prunes_what_store_every_writes(tmp_path):
    train(tmp_path, 8, Retention(last=1), store_every=2)
    assert epoch_files_on_disk(tmp_path) == ["checkpoint_epoch_7.pt", "model_epoch_7.pt"]


def test_without_a_retention_every_written_epoch_file_stays(tmp_path):
    train(tmp_path, 4, None, store_every=1)
    assert len(epoch_files_on_disk(tmp_path)) == 8


def test_info_and_verify_show_what_is_kept_and_why(tmp_path):
    train(tmp_path, 6, Retention(last=1, every=3))
    info = subprocess.run([sys.executable, "-m", "experiment_io", "info", str(tmp_path)], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    line = next(line for line in info.stdout.splitlines() if line.startswith("checkpoint_epoch_2.pt"))
    assert "kept: every 3" in line
    line = next(line for line in info.stdout.splitlines() if line.startswith("checkpoint_epoch_5.pt"))
    assert "kept: last 1, every 3" in line
    verify = subprocess.run([sys.executable, "-m", "experiment_io", "verify", str(tmp_path)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout


# --- a crash during a removal ---------------------------------------------------------------------


@pytest.mark.parametrize("step", ["written", "fsynced", "replaced", "directory_fsynced"])
def test_a_crash_at_any_step_of_a_save_that_removes_files_loses_nothing(tmp_path, step):
    """The child dies at ``step`` of the manifest's write in the save of epoch 2, which retires epoch 1's files
    (Retention(last=1)); ``train_model``'s saves are made durable behind the loop, so ``fsynced`` too comes after
    the manifest's rename: every step but ``written`` is after the commit (and may come before the files are
    unlinked)."""
    database = make_database()

    def body(report):
        def die(at, path):
            name = os.path.basename(path)
            of_manifest = name == MANIFEST_NAME or name.startswith(f".{MANIFEST_NAME}.")
            saving_epoch_2 = any(n.startswith((".model_epoch_2.pt.", "model_epoch_2.pt")) for n in os.listdir(tmp_path))
            if at == step and of_manifest and saving_epoch_2:
                os._exit(9)

        with storage.observe_write_steps(die):
            tm, controller, tracker = setup_training(make_training_modules(),
                                                     SetupParams(stopping_key="mse", batch_size=32, max_epochs=5))
            train_model(tm, database, controller, tracker, None, None, quiet=True, directory=str(tmp_path),
                        retention=Retention(last=1), plots=False, evaluate_best=False)

    pid, _ = fork_child(body)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 9, f"the child did not die at {step} ({status})"
    assert_every_file_recorded_and_every_live_record_present(tmp_path)
    records = manifest(tmp_path)
    committed = "model_epoch_2.pt" in records
    assert committed == (step != "written")  # the process died; the rename stands
    if committed and step in ("fsynced", "directory_fsynced"):  # behind the loop: the removal may have begun
        assert records.get("model_epoch_1.pt", {"retired": True})["retired"] is True
    elif committed:  # committed with epoch 1's files retired, which are still there
        assert records["model_epoch_1.pt"]["retired"] is True and (tmp_path / "model_epoch_1.pt").exists()
        verify = subprocess.run([sys.executable, "-m", "experiment_io", "verify", str(tmp_path)],
                                capture_output=True, text=True)
        assert verify.returncode == 0 and "retired  model_epoch_1.pt" in verify.stdout, verify.stdout
    check = load_checkpoint_from_cwd(directory=str(tmp_path), database=database)
    assert check["controller"].position.epoch == (3 if committed else 2)
    # the resumed run finishes the removal with its next save
    train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, retention=Retention(last=1), plots=False,
                evaluate_best=False)
    assert epoch_files_on_disk(tmp_path) == ["checkpoint_epoch_4.pt", "model_epoch_4.pt"]
    assert not any(r.get("retired") for r in manifest(tmp_path).values())
    assert_every_file_recorded_and_every_live_record_present(tmp_path)


def test_a_file_that_cannot_be_removed_stays_recorded_as_retired(tmp_path, monkeypatch):
    real_unlink = os.unlink

    def refuse(path, *args, **kwargs):
        if epoch_of(os.path.basename(path)) is not None:
            raise PermissionError(13, "Permission denied", path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse)
    train(tmp_path, 3, Retention(last=1))
    records = manifest(tmp_path)
    assert records["model_epoch_0.pt"]["retired"] is True and (tmp_path / "model_epoch_0.pt").exists()
    assert_every_file_recorded_and_every_live_record_present(tmp_path)
    monkeypatch.setattr(os, "unlink", real_unlink)
    check = load_checkpoint_from_cwd(directory=str(tmp_path), database=make_database())
    check["controller"].max_epochs = 4
    train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, retention=Retention(last=1), plots=False,
                evaluate_best=False)
    assert epoch_files_on_disk(tmp_path) == ["checkpoint_epoch_3.pt", "model_epoch_3.pt"]
