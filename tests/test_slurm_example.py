"""The SLURM example (examples/slurm/) trained across allocations, on this machine.

``local_driver.py`` plays what SLURM and ``job.sbatch`` do: it starts ``train.py``
once per allocation in one run directory, preempts every allocation but the last
with SIGUSR1 (the second with SIGTERM), expects exit status 75 each time, lets the
last allocation finish, trains an uninterrupted reference and compares both
``final_result.pt`` files bit for bit. The job script's own logic (forwarding the
batch shell's signal, requeueing on 75) is tested with stand-ins for train.py and
scontrol.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from experiment_io import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow  # every test here runs training in subprocesses

SLURM_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "slurm")
DRIVER = os.path.join(SLURM_DIR, "local_driver.py")
JOB_SCRIPT = os.path.join(SLURM_DIR, "job.sbatch")
EPOCHS = 12

def run_driver(work_dir, *extra):
    proc = subprocess.run([sys.executable, DRIVER, "--work-dir", str(work_dir), "--epochs", str(EPOCHS), *extra],
                          capture_output=True, text=True, timeout=170)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"local_driver.py failed (exit status {proc.returncode}):\n{output[-6000:]}"
    return output


def manifest_files(run_dir):
    with open(os.path.join(run_dir, "experiment_manifest.json")) as f:
        return json.load(f)["files"]


def check_finished_run(run_dir):
    last = manifest_files(run_dir)["last_checkpoint.pt"]
    assert last["epochs_done"] == EPOCHS
    assert last["samples_done"] == 0 and last["interrupted"] is None
    result = torch.load(os.path.join(run_dir, "final_result.pt"), map_location="cpu", weights_only=True)
    assert result["stop_reason"] == f"reached max_epochs={EPOCHS}"
    assert all(len(values) == EPOCHS for values in result["history"]["valid"].values())
    return last



def test_three_allocations_equal_an_uninterrupted_run(tmp_path):
    output = run_driver(tmp_path, "--allocations", "3")

    for index, restart_count in ((1, 0), (2, 1), (3, 2)):
        assert f"allocation {index} of 3 (SLURM_RESTART_COUNT={restart_count})" in output
        assert f"SLURM_RESTART_COUNT={restart_count} host=" in output  # logged by train.py
    assert "allocation 1: SIGUSR1 sent" in output
    assert "allocation 2: SIGTERM sent" in output
    assert output.count(f"exit status {PREEMPTED_EXIT_CODE} (preempted, checkpoint saved)") == 2
    assert "allocation 3: training complete (exit status 0)" in output
    assert output.count("resuming from the checkpoint") == 2
    for part in ("model", "controller", "history", "best_epoch", "best_model", "test"):
        assert f"  {part}: identical" in output
    assert "OK: the run trained in 3 allocations is bit-for-bit identical to the uninterrupted run" in output

    resumed = check_finished_run(tmp_path / "allocations")
    reference = check_finished_run(tmp_path / "reference")
    assert resumed["step"] == reference["step"]


FAKE_TRAIN = """\
echo "fake train.py in $PWD: $*"
trap 'echo "fake train.py: got USR1"; exit ${FAKE_SIGNAL_EXIT:-75}' USR1
trap 'echo "fake train.py: got TERM"; exit ${FAKE_SIGNAL_EXIT:-75}' TERM
touch "$STARTED"
if [ -n "${FAKE_EXIT:-}" ]; then exit "$FAKE_EXIT"; fi
for i in $(seq 400); do sleep 0.05; done
exit 99
"""

FAKE_SCONTROL = """\
#!/bin/bash
echo "$*" >> "$SCONTROL_LOG"
"""

FAKE_STATUS = """\
#!/bin/bash
echo "fake experiment-io $*: exit ${FAKE_STATUS:-1}"
exit "${FAKE_STATUS:-1}"
"""


def run_job_script(tmp_path, *, signal_name=None, slurm=False, restart_count=None, fake_exit=None, signal_exit=None,
                   run_status=None):
    """Run job.sbatch with a stand-in for train.py (and for scontrol); signal the batch shell like B:USR1."""
    (tmp_path / "fake_train.sh").write_text(FAKE_TRAIN)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    (bin_dir / "experiment-io").write_text(FAKE_STATUS)
    (bin_dir / "experiment-io").chmod(0o755)
    started, scontrol_log, run_dir = tmp_path / "started", tmp_path / "scontrol.log", tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHON="bash", TRAIN_PY=str(tmp_path / "fake_train.sh"),
               RUN_DIR=str(run_dir), STARTED=str(started), SCONTROL_LOG=str(scontrol_log))
    if slurm:
        env.update(SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=SLURM_DIR)
    if restart_count is not None:
        env["SLURM_RESTART_COUNT"] = str(restart_count)
    if fake_exit is not None:
        env["FAKE_EXIT"] = str(fake_exit)
    if signal_exit is not None:
        env["FAKE_SIGNAL_EXIT"] = str(signal_exit)
    if run_status is not None:
        env["FAKE_STATUS"] = str(run_status)
    proc = subprocess.Popen(["bash", JOB_SCRIPT, "--epochs", "7"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        if signal_name:
            deadline = time.monotonic() + 30
            while not started.exists():
                assert proc.poll() is None and time.monotonic() < deadline, "the stand-in for train.py never started"
                time.sleep(0.01)
            proc.send_signal(getattr(signal, "SIG" + signal_name))
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    requeues = scontrol_log.read_text().splitlines() if scontrol_log.exists() else []
    assert f"fake train.py in {run_dir}: --run-dir {run_dir} --epochs 7" in output  # cwd and arguments
    return proc.returncode, output, requeues


@pytest.mark.parametrize("signal_name", ["USR1", "TERM"])
def test_job_script_forwards_the_signal_to_python(tmp_path, signal_name):
    """With B:USR1 only the batch shell gets the signal: it must pass it on and wait for the exit status."""
    status, output, requeues = run_job_script(tmp_path, signal_name=signal_name)
    assert f"[job.sbatch] SIG{signal_name} received: forwarding it to python" in output
    assert f"fake train.py: got {signal_name}" in output
    assert f"train.py was preempted (exit status {PREEMPTED_EXIT_CODE}" in output
    assert "not under SLURM: nothing to requeue" in output
    assert status == PREEMPTED_EXIT_CODE and requeues == []


def test_job_script_requeues_after_the_usr1_warning(tmp_path):
    status, output, requeues = run_job_script(tmp_path, signal_name="USR1", slurm=True, restart_count=2)
    assert "job 4242 on" in output and "SLURM_RESTART_COUNT=2" in output
    assert requeues == ["requeue 4242"]
    assert "requeued job 4242; it resumes from the checkpoint as restart 3" in output
    assert status == 0


@pytest.mark.parametrize("launcher_exit, run_status", [(1, PREEMPTED_EXIT_CODE), (128 + 10, 4), (1, 0)])
def test_job_script_asks_the_run_when_the_exit_status_does_not_say(tmp_path, launcher_exit, run_status):
    """torchrun ends with 1 when its ranks exit with 75; a signal during python's start-up kills it (128+N) before
    anything is saved: after a signal, experiment-io status decides (75 or 4: requeue; 0: finished)."""
    status, output, requeues = run_job_script(tmp_path, signal_name="USR1", slurm=True, signal_exit=launcher_exit,
                                              run_status=run_status)
    assert f"fake experiment-io status {tmp_path / 'run'}: exit {run_status}" in output
    if run_status == 0:
        assert requeues == [] and status == 0 and "the run is finished" in output
    else:
        assert f"exit status {launcher_exit} after SIGUSR1: the run stopped on the signal" in output
        assert requeues == ["requeue 4242"] and status == 0


@pytest.mark.parametrize("run_status", [1, 4])
def test_job_script_does_not_requeue_a_failure_after_a_signal(tmp_path, run_status):
    """No intact checkpoint (1), or a run that did not stop on the signal although python was running (4: a crash
    after the signal, a final save that failed): a failure, not a preemption."""
    status, output, requeues = run_job_script(tmp_path, signal_name="USR1", slurm=True, signal_exit=1,
                                              run_status=run_status)
    assert requeues == [] and status == 1 and "train.py failed with exit status 1" in output


@pytest.mark.parametrize("case", ["sigterm", "max_restarts", "done", "failed"])
def test_job_script_does_not_requeue(tmp_path, case):
    """Not after a SIGTERM alone (scancel), nor past MAX_RESTARTS, nor on success or failure."""
    kwargs = {"sigterm": dict(signal_name="TERM"), "max_restarts": dict(signal_name="USR1", restart_count=20),
              "done": dict(fake_exit=0), "failed": dict(fake_exit=3)}[case]
    status, output, requeues = run_job_script(tmp_path, slurm=True, **kwargs)
    assert requeues == []
    expected = {"sigterm": (PREEMPTED_EXIT_CODE, "SIGTERM without the SIGUSR1 warning"),
                "max_restarts": (PREEMPTED_EXIT_CODE, "already restarted 20 times"),
                "done": (0, "training complete"),
                "failed": (3, "train.py failed with exit status 3: not requeued")}[case]
    assert status == expected[0] and expected[1] in output, output


def test_two_nodes_of_torchrun_preempted_then_resumed_equal_an_uninterrupted_run(tmp_path):
    """Two "nodes" (torchrun --nnodes=2 on localhost), SIGUSR1 to every rank, then SIGTERM, then the end."""
    output = run_driver(tmp_path, "--nodes", "2", "--allocations", "3")
    assert output.count(f"exit status {PREEMPTED_EXIT_CODE} (preempted, checkpoint saved)") == 2
    assert "OK: the run trained in 3 allocations is bit-for-bit identical to the uninterrupted run" in output
    files = manifest_files(tmp_path / "allocations")
    assert files["last_checkpoint.pt"]["world_size"] == 2
    check_finished_run(tmp_path / "allocations")


def test_the_multinode_job_script_is_valid_bash():
    subprocess.run(["bash", "-n", os.path.join(SLURM_DIR, "job_multinode.sbatch")], check=True)
