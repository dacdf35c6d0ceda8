"""Data-parallel training under torchrun (gloo on the CPU, real processes): exact restarts, one writer, agreement.

Every test launches ``tests/scripts/ddp_driver.py`` with ``torchrun`` and compares
what the ranks trained with an uninterrupted run of the same number of ranks.
"""
import collections
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from experiment_io import PREEMPTED_EXIT_CODE, load_model_from_cwd
from experiment_io.frontends.cli import main as cli_main
from experiment_io.storage.manifest import read_manifest

from helpers import assert_bitwise_equal

pytestmark = pytest.mark.slow  # every test here launches ranks with torchrun

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "ddp_driver.py")
SCRIPTS = os.path.dirname(DRIVER)
sys.path.insert(0, SCRIPTS)
import driver_model  # noqa: E402,F401  (the model class of the driver's files, imported as a prediction script would)
TIMEOUT = 240
N_TRAIN = 105  # samples of the driver's training split


def torchrun(cwd, nproc, *args, launcher=("--standalone",)):
    """Run the driver under torchrun in ``cwd``; return the completed process."""
    env = dict(os.environ, PYTHONPATH=SCRIPTS + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}", DRIVER, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def finished(proc, nproc):
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    for rank in range(nproc):
        assert f"FINISHED rank {rank}" in proc.stdout, output[-4000:]


def result(directory):
    return torch.load(os.path.join(directory, "result.pt"), weights_only=True)


def batches(directory):
    """``{rank: [(epoch, [sample ids])]}`` from the ranks' logs."""
    logs = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("batches.rank"):
            rank = int(name[len("batches.rank"):-len(".log")])
            with open(os.path.join(directory, name)) as f:
                logs[rank] = [(int(e), [int(i) for i in ids.split()]) for e, ids in (line.split(":") for line in f)]
    return logs


def samples_of_epoch(logs, epoch):
    return collections.Counter(i for lines in logs.values() for e, ids in lines if e == epoch for i in ids)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run with 2 ranks, checkpointing every 3 batches."""
    directory = tmp_path_factory.mktemp("reference")
    finished(torchrun(directory, 2, "--every", "3"), 2)
    return directory


def test_each_sample_once_per_epoch_on_disjoint_shards(reference):
    logs = batches(reference)
    assert sorted(logs) == [0, 1]
    for epoch in range(3):
        seen = samples_of_epoch(logs, epoch)
        assert len(seen) == N_TRAIN and set(seen.values()) == {1}
        rank0 = {i for e, ids in logs[0] if e == epoch for i in ids}
        rank1 = {i for e, ids in logs[1] if e == epoch for i in ids}
        assert rank0 and rank1 and not rank0 & rank1
    files = read_manifest(str(reference))[1]
    assert files["last_checkpoint.pt"]["world_size"] == 2


def test_the_files_hold_the_plain_model_and_load_in_one_process(reference):
    model = load_model_from_cwd(directory=str(reference))
    assert type(model).__name__ == "DropoutNet"
    assert_bitwise_equal(dict(model.state_dict()), dict(result(reference)["best_model_state"]))


@pytest.mark.parametrize("async_save", [False, True])
def test_sigkill_of_one_rank_then_restart_is_bit_for_bit(reference, tmp_path, async_save):
    extra = ["--async"] if async_save else []
    killed = torchrun(tmp_path, 2, "--every", "3", "--kill-rank", "1", "--kill-at", "11", *extra)
    assert killed.returncode != 0 and not (tmp_path / "result.pt").exists()
    finished(torchrun(tmp_path, 2, "--every", "3", *extra), 2)
    assert_bitwise_equal(result(tmp_path), result(reference))


def test_three_ranks_sigkill_then_restart_is_bit_for_bit(tmp_path):
    """With three ranks the order in which gradients are added matters: it must not change at a restart."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    reference.mkdir(), resumed.mkdir()
    finished(torchrun(reference, 3, "--every", "2"), 3)
    killed = torchrun(resumed, 3, "--every", "2", "--kill-rank", "2", "--kill-at", "7")
    assert killed.returncode != 0
    finished(torchrun(resumed, 3, "--every", "2"), 3)
    assert_bitwise_equal(result(resumed), result(reference))


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_to_every_rank_stops_all_at_one_boundary_then_restart_is_bit_for_bit(reference, tmp_path, signame):
    stopped = torchrun(tmp_path, 2, "--every", "3", "--raise-signal", signame, "--raise-at", "9")
    assert not (tmp_path / "result.pt").exists()
    if signame == "SIGTERM":
        assert stopped.returncode != 0
        for rank in (0, 1):
            assert (tmp_path / f"exit.rank{rank}").read_text() == str(PREEMPTED_EXIT_CODE)
    else:  # Ctrl-C: train_model returns on every rank
        assert stopped.returncode == 0 and stopped.stdout.count("INTERRUPTED") == 2, stopped.stderr[-3000:]
    record = read_manifest(str(tmp_path))[1]["last_checkpoint.pt"]
    assert record["interrupted"] == signame and record["step"] == 9
    # torchrun's own status does not say "preempted"; the run's does, for a job script
    assert cli_main(["status", str(tmp_path)]) == PREEMPTED_EXIT_CODE
    logs = batches(tmp_path)
    assert len(logs[0]) == len(logs[1]) == 9  # both ranks stopped after the same batch
    finished(torchrun(tmp_path, 2, "--every", "3"), 2)
    assert_bitwise_equal(result(tmp_path), result(reference))
    assert cli_main(["status", str(tmp_path)]) == 0


def test_a_signal_to_one_rank_stops_every_rank(tmp_path):
    """SLURM may signal one task only: the other rank hears of it at the next batch boundary."""
    torchrun(tmp_path, 2, "--raise-signal", "SIGUSR1", "--raise-at", "5", "--raise-rank", "1")
    for rank in (0, 1):
        assert (tmp_path / f"exit.rank{rank}").read_text() == str(PREEMPTED_EXIT_CODE)
    record = read_manifest(str(tmp_path))[1]["last_checkpoint.pt"]
    assert record["interrupted"] == "SIGUSR1" and record["step"] == 5
    logs = batches(tmp_path)
    assert len(logs[0]) == len(logs[1]) == 5


@pytest.mark.parametrize("ranks", [3, 1])
def test_restart_with_another_number_of_ranks_sees_each_remaining_sample_once(tmp_path, ranks):
    torchrun(tmp_path, 2, "--raise-signal", "SIGTERM", "--raise-at", "4")  # stops mid-epoch 0, after 4 steps of 2 x 8
    assert read_manifest(str(tmp_path))[1]["last_checkpoint.pt"]["samples_done"] == 64
    before = batches(tmp_path)
    for name in os.listdir(tmp_path):
        if name.startswith("batches."):
            os.rename(tmp_path / name, tmp_path / ("before." + name))
    finished(torchrun(tmp_path, ranks), ranks)
    after = batches(tmp_path)
    assert sorted(after) == list(range(ranks))
    seen = samples_of_epoch(before, 0) + samples_of_epoch(after, 0)
    assert len(seen) == N_TRAIN and set(seen.values()) == {1}, "the interrupted epoch"
    for epoch in (1, 2):
        seen = samples_of_epoch(after, epoch)
        assert len(seen) == N_TRAIN and set(seen.values()) == {1}, f"epoch {epoch}"
    assert read_manifest(str(tmp_path))[1]["last_checkpoint.pt"]["world_size"] == ranks
    assert isinstance(load_model_from_cwd(directory=str(tmp_path)), torch.nn.Module)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failed_save_on_rank_0_stops_every_rank(tmp_path, async_save):
    proc = torchrun(tmp_path, 2, "--every", "2", "--fail-save", "3", *(["--async"] if async_save else []))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "FINISHED" not in proc.stdout
    assert "CheckpointWriteError" in output and "RankFailedError" in output, output[-4000:]


def test_a_model_wrapped_in_ddp_by_the_user_trains_as_the_library_wraps_it(reference, tmp_path):
    finished(torchrun(tmp_path, 2, "--every", "3", "--wrap"), 2)
    assert_bitwise_equal(result(tmp_path), result(reference))


def test_max_restarts_heals_a_killed_rank(reference, tmp_path):
    for attempt in range(3):  # a restarted attempt must reconnect every time
        directory = tmp_path / f"try{attempt}"
        directory.mkdir()
        proc = torchrun(directory, 2, "--every", "3", "--kill-rank", "1", "--kill-at", "11",
                        launcher=("--standalone", "--max-restarts=1"))
        finished(proc, 2)
        assert_bitwise_equal(result(directory), result(reference))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_one_writer_same_files_as_one_node(reference, tmp_path):
    port = free_port()
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    for node_rank, directory in enumerate(nodes):
        directory.mkdir()
        shutil.copy(reference / "data.h5", directory / "data.h5")
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
                   "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", DRIVER, "--every", "3"]
        procs.append(subprocess.Popen(command, cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    assert_bitwise_equal(result(nodes[0]), result(reference))
    written = [n for n in os.listdir(nodes[1]) if n.endswith((".pt", ".json", ".lock"))]
    assert written == [], "only global rank 0 writes"


def own_loop(cwd, nproc, *args):
    script = os.path.join(SCRIPTS, "own_loop_ddp.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    proc = subprocess.run(command, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def test_own_loop_saves_from_rank_zero_and_resumes_with_another_world_size(tmp_path):
    assert own_loop(tmp_path, 2, "--stop-after", "2").stdout.count("STOPPED") == 2
    own_loop(tmp_path, 1)
    logs = collections.defaultdict(list)
    for name in os.listdir(tmp_path):
        if name.startswith("samples."):
            for line in open(tmp_path / name):
                epoch, ids = line.split(":")
                logs[int(epoch)] += [int(i) for i in ids.split()]
    for epoch in (0, 1):
        assert sorted(logs[epoch]) == sorted(set(logs[epoch])), f"a sample seen twice in epoch {epoch}"
    assert len(logs[0]) >= 30 - 2 and len(logs[1]) == 30  # drop_last leaves out less than a rank count


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: two GPUs")
def test_nccl_on_two_gpus_sigterm_then_restart(tmp_path):
    stopped = torchrun(tmp_path, 2, "--device", "auto", "--every", "3", "--raise-signal", "SIGTERM", "--raise-at", "9")
    assert stopped.returncode != 0
    for rank in (0, 1):
        assert (tmp_path / f"exit.rank{rank}").read_text() == str(PREEMPTED_EXIT_CODE)
    assert read_manifest(str(tmp_path))[1]["last_checkpoint.pt"]["model_device"] == "cuda:0"
    finished(torchrun(tmp_path, 2, "--device", "auto", "--every", "3"), 2)
    model = load_model_from_cwd(directory=str(tmp_path), model_device="cpu")  # a GPU run, predicted on the CPU
    assert next(model.parameters()).device.type == "cpu"
