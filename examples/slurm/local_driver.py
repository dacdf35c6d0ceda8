"""Play several SLURM allocations of ``train.py`` on this machine, then check the result.

Without a cluster, this does what SLURM and ``job.sbatch`` do::

    python examples/slurm/local_driver.py [--allocations 3] [--job-script]

1. Each allocation starts ``train.py`` in the same run directory
   (``WORK_DIR/allocations``), with ``SLURM_RESTART_COUNT`` set to 0, 1, 2, ...
   The first starts a new run, every later one resumes from the checkpoint.
2. Every allocation but the last is preempted: once the run's
   ``experiment_manifest.json`` shows ``--interrupt-after-steps`` more optimizer
   steps in ``last_checkpoint.pt`` than at the allocation's start (or after
   ``--interrupt-after-seconds``), the driver sends SIGUSR1, as
   ``#SBATCH --signal=B:USR1@120`` does before a time limit; the second
   allocation gets SIGTERM instead, as at the time limit itself or on scancel.
   The allocation must end with exit status 75 (``PREEMPTED_EXIT_CODE``: checkpoint
   saved), and the driver starts the next one, as ``scontrol requeue`` would.
3. The last allocation runs to the end and must exit with 0.
4. An uninterrupted reference run trains the same experiment in
   ``WORK_DIR/reference``; the two ``final_result.pt`` files (final weights,
   optimizer and scheduler state, metric history, best epoch and best model, test
   errors) must be identical, bit for bit.

With ``--job-script`` each allocation runs ``bash job.sbatch`` instead, and the
signal goes to that shell, which must pass it on to python (as with ``B:``).

The exit status is 0 when everything matched, 1 otherwise. Small by default
(1000 clusters, 12 epochs): it runs in some seconds on two cores.
"""
import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import torch

SLURM_DIR = os.path.dirname(os.path.abspath(__file__))
if SLURM_DIR not in sys.path:
    sys.path.insert(0, SLURM_DIR)

import train  # noqa: E402  (also puts examples/ on sys.path)
import lennard_jones  # noqa: E402
from experiment_io import PREEMPTED_EXIT_CODE  # noqa: E402
from experiment_io.storage.manifest import MANIFEST_NAME

TRAIN_PY = os.path.join(SLURM_DIR, "train.py")
JOB_SCRIPT = os.path.join(SLURM_DIR, "job.sbatch")
DEFAULT_WORK_DIR = os.path.join(SLURM_DIR, "run")
RUN_NAME = "allocations"
REFERENCE_NAME = "reference"
LAST = "last_checkpoint.pt"


def say(message):
    print(f"[local_driver] {message}", flush=True)


def last_checkpoint_record(run_dir):
    """The manifest record of ``last_checkpoint.pt`` (``None`` before the first checkpoint).

    The manifest is replaced atomically at the end of every save, so a read sees a
    whole file; it holds ``step``, ``epochs_done``, ``samples_done`` and ``interrupted``.
    """
    try:
        with open(os.path.join(run_dir, MANIFEST_NAME)) as f:
            return json.load(f)["files"].get(LAST)
    except (FileNotFoundError, ValueError, KeyError):
        return None


def describe(record):
    if record is None:
        return "no checkpoint"
    where = f"epoch {record['epochs_done']}, {record['samples_done']} samples into it, step {record['step']}"
    return where + (f", written on {record['interrupted']}" if record.get("interrupted") else "")


class Allocation:
    """One run of train.py (or of job.sbatch) in the run directory, as one SLURM allocation."""

    def __init__(self, args, run_dir, restart_count=None):
        self.run_dir = run_dir
        self.processes = []
        env = dict(os.environ)
        env.pop("SLURM_JOB_ID", None)  # never let anything here call scontrol
        env.pop("SLURM_RESTART_COUNT", None)
        if restart_count is not None:
            env["SLURM_RESTART_COUNT"] = str(restart_count)
        # One thread: small models train much faster so on a busy machine. Both runs
        # use the same setting, as the comparison needs.
        env.setdefault("OMP_NUM_THREADS", "1")
        train_args = ["--data", args.data, "--epochs", str(args.epochs), "--n-configs", str(args.n_configs),
                      "--checkpoint-every-seconds", str(args.checkpoint_every_seconds),
                      "--checkpoint-every-batches", str(args.checkpoint_every_batches)]
        self.started = time.monotonic()
        self.logs = []
        if args.nodes > 1:  # one torchrun per "node", rendezvous on loopback, as srun would start them
            port = free_port()
            for node in range(args.nodes):
                command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={args.nodes}", f"--node_rank={node}",
                           "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                           TRAIN_PY, "--run-dir", run_dir, *train_args]
                log = open(os.path.join(run_dir, f"node{node}.log"), "a+")
                self.logs.append(log)
                self.processes.append(subprocess.Popen(command, env=env, cwd=run_dir, stdout=log, stderr=log))
            return
        if args.job_script:
            env["RUN_DIR"], env["PYTHON"], env["TRAIN_PY"] = run_dir, sys.executable, TRAIN_PY
            command = ["bash", JOB_SCRIPT, *train_args]
        else:
            command = [sys.executable, TRAIN_PY, "--run-dir", run_dir, *train_args]
        self.processes.append(subprocess.Popen(command, env=env, cwd=run_dir))

    @property
    def process(self):
        return self.processes[0]

    def send_signal(self, signum):
        """The signal to the job's processes: the one process, or every rank of every "node"."""
        if not self.logs:
            self.process.send_signal(signum)
            return [self.process.pid]
        ranks = [child for p in self.processes for child in children(p.pid)]
        for pid in ranks:
            os.kill(pid, signum)
        return ranks

    def wait(self, timeout):
        """Wait for the job; return its exit status (several "nodes": the ranks' statuses agreed, or 1)."""
        try:
            statuses = [p.wait(timeout) for p in self.processes]
        except subprocess.TimeoutExpired:
            for p in self.processes:
                p.kill()
                p.wait()
            raise SystemExit(f"[local_driver] the allocation did not end within {timeout} s; killed it")
        if not self.logs:
            return statuses[0]
        if all(s == 0 for s in statuses):
            return 0
        ranks = []  # torchrun ends with 1 when a rank fails; it reports each rank's status
        for log in self.logs:
            log.seek(0)
            ranks += [int(line.split(":")[1].split()[0]) for line in log if line.strip().startswith("exitcode")]
        return ranks[0] if ranks and len(set(ranks)) == 1 else 1

    def wait_for_progress(self, start_step, steps, seconds, timeout):
        """Wait until the run has ``steps`` more steps checkpointed (or ``seconds`` passed).

        :return: ``False`` when the process ended first.
        """
        deadline = self.started + timeout
        while self.process.poll() is None:
            now = time.monotonic()
            if now > deadline:
                self.wait(0)
            if seconds is not None:
                if now - self.started >= seconds:
                    return True
            else:
                record = last_checkpoint_record(self.run_dir)
                if record is not None and record["step"] >= start_step + steps:
                    return True
            time.sleep(0.01)
        return False


def run_allocations(args, run_dir, steps_per_allocation):
    os.makedirs(run_dir)
    for index in range(args.allocations):
        last = index == args.allocations - 1
        before = last_checkpoint_record(run_dir)
        start_step = before["step"] if before else 0
        say(f"allocation {index + 1} of {args.allocations} (SLURM_RESTART_COUNT={index}): "
            f"{'starts a new run' if before is None else 'resumes from ' + describe(before)}")
        allocation = Allocation(args, run_dir, restart_count=index)
        if last:
            status = allocation.wait(args.timeout)
            if status != 0:
                raise SystemExit(f"[local_driver] the last allocation ended with exit status {status}, not 0")
            say(f"allocation {index + 1}: training complete (exit status 0)")
            break
        signum = signal.SIGTERM if index == 1 else signal.SIGUSR1
        if not allocation.wait_for_progress(start_step, steps_per_allocation, args.interrupt_after_seconds, args.timeout):
            raise SystemExit(
                f"[local_driver] allocation {index + 1} ended (exit status {allocation.process.returncode}) before it "
                "could be preempted: train longer (--epochs) or interrupt sooner (--interrupt-after-steps)")
        pids = allocation.send_signal(signum)
        say(f"allocation {index + 1}: {signum.name} sent to pid {', '.join(map(str, pids))} "
            f"({time.monotonic() - allocation.started:.1f} s into the allocation)")
        status = allocation.wait(args.timeout)
        after = last_checkpoint_record(run_dir)
        if status != PREEMPTED_EXIT_CODE:
            raise SystemExit(f"[local_driver] allocation {index + 1} ended with exit status {status} after "
                             f"{signum.name}, not {PREEMPTED_EXIT_CODE} (checkpoint saved)")
        say(f"allocation {index + 1}: exit status {status} (preempted, checkpoint saved): {describe(after)}")


def children(pid):
    """The pids of the child processes of ``pid`` (Linux)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compare(run_dir, reference_dir):
    """Print, per part of the result, whether both runs ended bit-for-bit equal; return ``True`` if all did."""
    def load(directory):
        return torch.load(os.path.join(directory, train.RESULT_NAME), map_location="cpu", weights_only=True)

    resumed, reference = load(run_dir), load(reference_dir)
    same = True
    for key in sorted(set(resumed) | set(reference)):
        differences = (lennard_jones._differences(resumed[key], reference[key])
                       if key in resumed and key in reference else ["(missing in one run)"])
        say(f"  {key}: {'identical' if not differences else 'DIFFERENT at ' + ', '.join(differences[:5])}")
        same = same and not differences
    return same


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default=DEFAULT_WORK_DIR,
                        help=f"holds the data and both run directories; emptied of them first (default: {DEFAULT_WORK_DIR})")
    parser.add_argument("--allocations", type=int, default=3, help="allocations of the interrupted run (default: 3)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs to train (default: 12)")
    parser.add_argument("--n-configs", type=int, default=1000, help="clusters in the data set (default: 1000)")
    parser.add_argument("--checkpoint-every-seconds", type=float, default=0.5,
                        help="train.py's mid-epoch checkpoint interval in seconds (default: 0.5)")
    parser.add_argument("--checkpoint-every-batches", type=int, default=5,
                        help="train.py's mid-epoch checkpoint interval in batches (default: 5)")
    parser.add_argument("--interrupt-after-steps", type=int, default=None,
                        help="preempt an allocation once this many more steps are checkpointed "
                             "(default: the run's steps divided by one more than the allocations, so that "
                             "the last allocation has twice as many steps left to train)")
    parser.add_argument("--interrupt-after-seconds", type=float, default=None,
                        help="preempt an allocation this many seconds after its start instead")
    parser.add_argument("--job-script", action="store_true",
                        help="run each allocation as 'bash job.sbatch' and signal that shell, not python")
    parser.add_argument("--nodes", type=int, default=1,
                        help="train data-parallel on this many 'nodes' of one rank each: one torchrun --nnodes=N "
                             "per node on this machine, rendezvous on 127.0.0.1 (default: 1, one process); the "
                             "signal goes to every rank, as SLURM sends it to every task")
    parser.add_argument("--timeout", type=float, default=300, help="longest time one allocation may take (default: 300)")
    args = parser.parse_args(argv)
    if args.allocations < 1:
        parser.error("--allocations must be at least 1")
    args.work_dir = os.path.abspath(args.work_dir)
    args.data = os.path.join(args.work_dir, lennard_jones.DATA_NAME)
    run_dir, reference_dir = os.path.join(args.work_dir, RUN_NAME), os.path.join(args.work_dir, REFERENCE_NAME)
    started = time.monotonic()

    for directory in (run_dir, reference_dir):
        shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(args.work_dir, exist_ok=True)
    train.ensure_data(args.data, args.n_configs)
    n_train = train.open_database(args.data).split_size("train")
    total_steps = args.epochs * math.ceil(n_train / (train.DEFAULTS["batch_size"] * args.nodes))  # batch size per rank
    steps = args.interrupt_after_steps or max(1, total_steps // (args.allocations + 1))
    how = (f"{args.interrupt_after_seconds} s after its start" if args.interrupt_after_seconds is not None
           else f"once {steps} more steps are checkpointed")
    say(f"{args.epochs} epochs of {n_train} training clusters ({total_steps} steps) in {args.allocations} allocation(s); "
        f"each but the last is preempted {how}; data in {args.data}")

    run_allocations(args, run_dir, steps)
    say(f"reference: the same training without interruption in {reference_dir}")
    os.makedirs(reference_dir)
    status = Allocation(args, reference_dir).wait(args.timeout)
    if status != 0:
        raise SystemExit(f"[local_driver] the reference run ended with exit status {status}, not 0")

    say(f"comparing {train.RESULT_NAME} of both runs:")
    if not compare(run_dir, reference_dir):
        say(f"MISMATCH: the run trained in {args.allocations} allocations differs from the uninterrupted run")
        return 1
    say(f"OK: the run trained in {args.allocations} allocations is bit-for-bit identical to the uninterrupted run "
        f"({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
