"""What the command line prints and exits with, for a user and for a job script: names from the directory
escaped, each file once, a rollback said, a closed pipe, a run's status; and the library's own errors for bad
input elsewhere."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from experiment_io import HDF5Database, PREEMPTED_EXIT_CODE, load_checkpoint_from_cwd, load_model_from_cwd
from experiment_io.errors import (CorruptCheckpointError, DataFileNotFoundError, SetupError,
                                  UnknownNameError)
from experiment_io.frontends.cli import BROKEN_PIPE, NOT_FINISHED, ROLLED_BACK, main
from experiment_io.run.payloads import BEST_NAME, LAST_NAME
from experiment_io.storage.writer import RunWriter

from helpers import flip_bit, make_database, rewrite_manifest, train_tiny_run


@pytest.fixture
def run(tmp_path):
    train_tiny_run(tmp_path / "run", max_epochs=3)
    return tmp_path / "run"


def test_names_with_newlines_and_escapes_cannot_forge_lines_or_drive_the_terminal(run, capsys):
    for name in ("x\ncommitted       99 forged.pt", "\x1b[2J\x1b[31mred.pt"):
        (run / name).write_bytes(b"not a checkpoint")
    for command in ("list", "verify", "info"):
        main([command, str(run)])
        out = capsys.readouterr().out
        assert "\x1b" not in out
        assert not any(line.startswith("committed       99") for line in out.splitlines())
    main(["list", str(run)])
    out = capsys.readouterr().out
    assert "x\\ncommitted       99 forged.pt" in out and "\\x1b[2J" in out


def test_two_generations_of_equal_content_are_listed_once_each(run, capsys):
    writer = RunWriter(str(run))
    data = json.dumps({"same": 1}).encode()
    for _ in range(2):
        writer.save_files({"notes.json": ((lambda f: f.write(data)), {})})
    assert main(["verify", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines if "notes" in line] == ["notes.json", "notes.prev.json"]
    assert "(committed" in next(line for line in lines if " notes.json " in line)


def test_info_says_where_the_checkpoint_was_written_before_the_table(run, capsys):
    assert main(["info", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("file "))
    written = next(i for i, line in enumerate(lines) if "written by:" in line)
    legend = next(i for i, line in enumerate(lines) if line.startswith("epochs are numbered from 0"))
    assert written < legend < header and all(len(line.split()) >= 5 for line in lines[header + 1:])
    assert main(["list", str(run)]) == 0
    assert "epochs are numbered from 0" in capsys.readouterr().out


def test_a_closed_pipe_ends_the_output_quietly(run):
    process = subprocess.Popen([sys.executable, "-m", "experiment_io", "verify", str(run)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before anything is written, as `| head` is after its lines
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == BROKEN_PIPE
    assert "BrokenPipeError" not in stderr and "Traceback" not in stderr


def test_metrics_say_when_they_fall_back_to_an_older_generation(run, capsys):
    assert main(["metrics", str(run)]) == 0
    full = capsys.readouterr().out
    flip_bit(run / LAST_NAME)
    assert main(["metrics", str(run)]) == ROLLED_BACK
    captured = capsys.readouterr()
    assert "warning: the committed last_checkpoint.pt does not verify" in captured.err
    assert len(captured.out.splitlines()) == len(full.splitlines()) - 1  # one epoch fewer, and it says so
    assert main(["verify", str(run)]) == ROLLED_BACK


def test_status_of_a_finished_run_of_a_crashed_one_and_of_none(run, tmp_path, capsys):
    assert main(["status", str(run)]) == 0
    rewrite_manifest(run, lambda files: [files[n].update(finished=False) for n in (LAST_NAME, BEST_NAME)])
    assert main(["status", str(run)]) == NOT_FINISHED
    assert "not stopped by a signal" in capsys.readouterr().out
    rewrite_manifest(run, lambda files: files[LAST_NAME].update(interrupted="SIGTERM"))
    assert main(["status", str(run)]) == PREEMPTED_EXIT_CODE
    (tmp_path / "empty").mkdir()
    assert main(["status", str(tmp_path / "empty")]) == NOT_FINISHED
    assert main(["status", str(tmp_path / "mistyped")]) == 1  # an error, never "not started: requeue me"
    for name in os.listdir(run):
        if name.endswith(".pt") and "checkpoint" in name:
            flip_bit(run / name)
    assert main(["status", str(run)]) == 1


def test_a_planted_plots_link_is_not_written_through(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.makedirs(tmp_path / "run")
    os.symlink(outside, tmp_path / "run" / "plots")
    train_tiny_run(tmp_path / "run", max_epochs=2)  # the curves are not plotted; the run is not failed
    assert os.listdir(outside) == []
    assert main(["plot", str(tmp_path / "run")]) == 1
    assert "is a link" in capsys.readouterr().err and os.listdir(outside) == []
    os.unlink(tmp_path / "run" / "plots")  # the fix the message gives
    assert main(["plot", str(tmp_path / "run")]) == 0 and os.listdir(tmp_path / "run" / "plots")


def test_bad_input_raises_the_library_s_own_errors(tmp_path, run):
    with pytest.raises(SetupError, match="which='lst'"):
        load_checkpoint_from_cwd(directory=str(run), which="lst", database=make_database())
    with pytest.raises(SetupError):
        load_model_from_cwd(directory=str(run), which="lst")
    with h5py.File(tmp_path / "data.h5", "w") as h5:
        h5["x"], h5["y"] = np.zeros((10, 3), "float32"), np.zeros((10, 1), "float32")
    with pytest.raises(DataFileNotFoundError) as info:
        HDF5Database(tmp_path / "dat.h5", inputs=["x"], targets=["y"], seed=0)
    assert isinstance(info.value, FileNotFoundError) and "data.h5" in str(info.value)
    with pytest.raises(UnknownNameError) as info:
        HDF5Database(tmp_path / "data.h5", inputs=["X"], targets=["y"], seed=0)
    assert type(info.value).__module__ == "experiment_io.errors" and not type(info.value).__name__.startswith("_")
    assert isinstance(info.value, KeyError)


def test_every_checkpoint_damaged_names_the_intact_best_model(run):
    for name in os.listdir(run):
        if "checkpoint" in name and name.endswith(".pt"):
            flip_bit(run / name)
    with pytest.raises(CorruptCheckpointError) as info:
        load_checkpoint_from_cwd(directory=str(run), database=make_database())
    assert f"load_model_from_cwd(directory={str(run)!r})" in str(info.value)
    assert load_model_from_cwd(directory=str(run)) is not None  # the way on it names works



def test_with_the_structure_file_damaged_too_the_best_model_is_not_offered(run):
    for name in os.listdir(run):
        if ("checkpoint" in name or "structure" in name) and name.endswith(".pt"):
            flip_bit(run / name)
    with pytest.raises(CorruptCheckpointError) as info:
        load_checkpoint_from_cwd(directory=str(run), database=make_database())
    assert "load_model_from_cwd" not in str(info.value) and "Ways on:" in str(info.value)
