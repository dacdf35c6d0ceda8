"""Provenance in the manifest records: host, command, SLURM, git commit, resumes; never a reason for a save to fail."""
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from experiment_io import load_checkpoint_from_cwd, train_model
from experiment_io.training import provenance
from experiment_io.run.payloads import BEST_MODEL_NAME, LAST_NAME
from experiment_io.storage.manifest import MANIFEST_NAME

from helpers import make_database, train_tiny_run

TESTS = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from helpers import train_tiny_run
    train_tiny_run(sys.argv[1], max_epochs=1)
""")


def records(directory):
    return json.loads((directory / MANIFEST_NAME).read_text())["files"]


def run_script(script, run, env=None):
    result = subprocess.run([sys.executable, str(script), str(run), "--flag"], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=300)
    assert result.returncode == 0, result.stderr
    return records(run)


def test_records_carry_host_command_and_the_slurm_job(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=TESTS))
    files = run_script(script, tmp_path / "run", {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "2"})
    for name in (LAST_NAME, BEST_MODEL_NAME):
        record = files[name]
        assert record["host"] == socket.gethostname()
        assert str(script) in record["command"] and record["command"].endswith("--flag")
        assert record["slurm_job_id"] == "4242" and record["slurm_restart_count"] == 2
        assert record["resumes"] == 0 and record["world_size"] == 1


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_records_carry_the_git_commit_of_the_training_script_and_whether_it_was_dirty(tmp_path):
    repo = tmp_path / "project"
    repo.mkdir()
    script = repo / "train.py"
    script.write_text(SCRIPT.format(tests=TESTS))
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "train.py"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "train"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    clean = run_script(script, tmp_path / "clean")[LAST_NAME]
    assert clean["git_commit"] == head and clean["git_dirty"] is False
    script.write_text(script.read_text() + "\n# changed\n")
    dirty = run_script(script, tmp_path / "dirty")[LAST_NAME]
    assert dirty["git_commit"] == head and dirty["git_dirty"] is True
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "train.py").write_text(SCRIPT.format(tests=TESTS))
    assert "git_commit" not in run_script(outside / "train.py", tmp_path / "nogit")[LAST_NAME]


def test_a_git_that_hangs_or_fails_only_leaves_the_commit_out(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "git"
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    fields = provenance.process_provenance(git_timeout=0.3, fresh=True)
    assert "git_commit" not in fields and fields["host"] == socket.gethostname()
    fake.write_text("#!/bin/sh\necho broken >&2\nexit 128\n")
    assert "git_commit" not in provenance.process_provenance(fresh=True)
    train_tiny_run(str(tmp_path / "run"), max_epochs=1)
    assert "git_commit" not in records(tmp_path / "run")[LAST_NAME]
    monkeypatch.undo()
    provenance.process_provenance(fresh=True)  # the real git again for what this process saves next


def test_the_resume_count_grows_with_each_resume(tmp_path):
    database = make_database()
    train_tiny_run(str(tmp_path), database=database, max_epochs=1)
    assert records(tmp_path)[LAST_NAME]["resumes"] == 0
    for expected in (1, 2):
        check = load_checkpoint_from_cwd(directory=str(tmp_path), database=database)
        train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, max_epochs=expected + 1)
        assert records(tmp_path)[LAST_NAME]["resumes"] == expected


def test_info_shows_where_the_newest_checkpoint_came_from(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=TESTS))
    run_script(script, tmp_path / "run", {"SLURM_JOB_ID": "777"})
    info = subprocess.run([sys.executable, "-m", "experiment_io", "info", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert f"host {socket.gethostname()}" in info.stdout and "SLURM job 777" in info.stdout
    assert "resumed 0 time(s)" in info.stdout and f"command: {os.path.basename(sys.executable)} {script}" in info.stdout
