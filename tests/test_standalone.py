"""atomic_save and verified_load: round trips, generations, damage, crashes, kills and weights_only."""
import dataclasses
import logging
import os
import random
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experiment_io.storage import verification
from experiment_io.storage.generations import previous_name
from experiment_io.storage.lock import LOCK_NAME, RunLock
import experiment_io.storage.atomic as storage
from experiment_io.storage import manifest as run_manifest
from experiment_io.platform import archive
from experiment_io import ResumableSampler, atomic_save, verified_load
from experiment_io.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    ExperimentIOError,
    RunLockedError,
    SetupError,
    UnsafeCheckpointError,
)
from experiment_io.storage.writer import RunWriter
from experiment_io.experiment.rng import get_rng_state, set_rng_state

from helpers import (assert_bitwise_equal, flip_bit, fork_child, race, record_torch_loads, rewrite_manifest,
                     sigkill_after, snapshot_directory)

torch.set_num_threads(1)


@dataclasses.dataclass
class Point:
    x: int
    y: int


def state(step, n=64):
    """A checkpoint-like object whose every part depends on ``step``."""
    g = torch.Generator().manual_seed(step)
    return {
        "step": step,
        "model": {"weight": torch.randn(n, 4, generator=g), "bias": torch.full((4,), float(step))},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(n, generator=g)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "history": [float(step), [step, "epoch"]],
    }


def manifest_files(directory):
    return run_manifest.read_manifest(str(directory))[1]


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


DAMAGE = {"bit flip": flip_bit, "truncation": truncate}


def test_round_trip_is_bitwise_and_recorded(tmp_path):
    obj = {
        "nested": {"a": torch.tensor([float("nan"), -0.0, 1e-45, float("inf")]), "b": [torch.arange(5), (1, "x")]},
        "half": torch.randn(3, 3).to(torch.bfloat16),
        "double": torch.randn(2, dtype=torch.float64),
        "mask": torch.tensor([True, False]),
        "complex": torch.randn(2, dtype=torch.complex64),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
        "plain": {"epoch": 3, "lr": 0.5, "name": "run", "none": None},
    }
    path = tmp_path / "ckpt.pt"
    record = atomic_save(obj, path)
    assert_bitwise_equal(verified_load(path), obj)
    assert_bitwise_equal(torch.load(path, weights_only=True), obj)  # the file is what torch.save writes
    entry = manifest_files(tmp_path)["ckpt.pt"]
    assert entry["kind"] == "user"
    assert entry["size"] == os.path.getsize(path) == record.size
    assert entry["digest"] == verification.file_digest(path).digest == record.digest
    assert abs(entry["written_at"] - time.time()) < 60


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.recursive(
    st.one_of(st.integers(-2**62, 2**62), st.floats(allow_nan=False), st.text(max_size=5), st.none(),
              st.lists(st.floats(width=32, allow_nan=True), max_size=6).map(lambda v: torch.tensor(v, dtype=torch.float32))),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children, max_size=3)),
    max_leaves=8))
def test_round_trip_property(tmp_path, obj):
    path = tmp_path / "prop.pt"
    atomic_save(obj, path)
    assert_bitwise_equal(verified_load(path), obj)


def test_generations_rotate_and_several_files_share_the_manifest(tmp_path):
    for step in range(3):
        atomic_save(state(step), tmp_path / "a.pt")
    atomic_save(state(10), tmp_path / "b.pt")
    assert_bitwise_equal(torch.load(tmp_path / "a.prev.pt", weights_only=True), state(1))
    files = manifest_files(tmp_path)
    assert set(files) == {"a.pt", "a.prev.pt", "b.pt"}
    assert files["a.prev.pt"]["digest"] == verification.file_digest(tmp_path / "a.prev.pt").digest
    assert verified_load(tmp_path / "a.pt")["step"] == 2
    assert verified_load(tmp_path / "b.pt")["step"] == 10


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_file_falls_back_or_raises_in_strict_mode(tmp_path, caplog, damage):
    path = tmp_path / "ckpt.pt"
    atomic_save(state(1), path)
    atomic_save(state(2), path)
    DAMAGE[damage](path)
    before = snapshot_directory(tmp_path)
    with pytest.raises(CorruptCheckpointError, match="strict=True") as excinfo:
        verified_load(path, strict=True)
    assert str(path) in str(excinfo.value)
    with caplog.at_level(logging.WARNING, logger="experiment_io.standalone"):
        loaded = verified_load(path)
    assert_bitwise_equal(loaded, state(1))
    assert "ckpt.prev.pt" in caplog.text and str(path) in caplog.text
    assert snapshot_directory(tmp_path) == before  # a load modifies nothing

    # both generations damaged: nothing to fall back to
    DAMAGE[damage](tmp_path / "ckpt.prev.pt")
    with pytest.raises(CorruptCheckpointError, match="no intact generation"):
        verified_load(path)


def test_save_after_damage_keeps_the_intact_previous_generation(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save(state(1), path)
    atomic_save(state(2), path)
    flip_bit(path)
    atomic_save(state(3), path)  # the damaged file is overwritten, not rotated
    assert verified_load(path, strict=True)["step"] == 3
    flip_bit(path)
    assert verified_load(path)["step"] == 1


class Crash(BaseException):
    """Ends a save at a chosen step of the write protocol, as a kill would."""


@pytest.mark.parametrize("target", ["file", "manifest"])
@pytest.mark.parametrize("stage", ["written", "fsynced", "rotated", "replaced", "directory_fsynced"])
def test_crash_at_every_step_leaves_the_committed_generation(tmp_path, stage, target):
    path = tmp_path / "ckpt.pt"
    atomic_save(state(1), path)
    atomic_save(state(2), path)
    watched = "ckpt.pt" if target == "file" else run_manifest.MANIFEST_NAME

    def crash(stage_now, where):
        name = os.path.basename(where)  # the temporary ".<name>.<pid>.<token>.tmp" before the rename
        if stage_now == stage and (name in (watched, previous_name(watched)) or name.startswith(f".{watched}.")):
            raise Crash(stage)

    with storage.observe_write_steps(crash):
        if target == "manifest" and stage == "rotated":
            atomic_save(state(3), path)  # the manifest keeps no previous generation: no rotation to crash in
        else:
            with pytest.raises(Crash):
                atomic_save(state(3), path)
    committed = 3 if target == "manifest" and stage in ("replaced", "directory_fsynced", "rotated") else 2
    assert verified_load(path, strict=True)["step"] == committed
    assert verified_load(path)["step"] == committed
    # the next save recovers, and a damage to it falls back to a committed generation
    atomic_save(state(4), path)
    assert verified_load(path, strict=True)["step"] == 4
    flip_bit(path)
    assert verified_load(path)["step"] == committed


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True])
def test_sigkill_storm_leaves_a_verified_file_at_least_as_new_as_the_last_commit(tmp_path, async_save):
    path = str(tmp_path / "ckpt.pt")
    atomic_save(state(0, n=4096), path)
    rng = random.Random(3)
    committed, step, kills = 0, 1, 0
    for _ in range(30):
        def body(report, start=step):
            s = start
            while True:
                if async_save:  # returns once the previous save has committed
                    atomic_save(state(s, n=4096), path, async_save=True)
                    report(s - 1)
                else:
                    atomic_save(state(s, n=4096), path)
                    report(s)
                s += 1

        reports = sigkill_after(body, rng.uniform(0.0, 0.04))
        kills += 1
        if reports:
            committed = reports[-1]
        loaded = verified_load(path, strict=True)
        assert loaded["step"] >= committed, f"loaded step {loaded['step']} < committed step {committed}"
        assert_bitwise_equal(loaded, state(loaded["step"], n=4096))
        step = loaded["step"] + 1
    assert kills == 30 and committed > 0, "the writer never committed a save; the storm tested nothing"
    leftovers = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    atomic_save(state(step, n=4096), path)  # a new writer removes the temporaries of killed ones
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")], leftovers


def test_torch_load_always_gets_weights_only_true(tmp_path, monkeypatch, environment):
    path = tmp_path / "ckpt.pt"
    atomic_save(state(1), path)
    atomic_save(state(2), path)
    loads = record_torch_loads(monkeypatch)
    verified_load(path)
    verified_load(path, map_location="cpu", strict=True)
    flip_bit(path)
    verified_load(path)  # the fallback generation too
    assert [weights_only for _, weights_only in loads] == [True, True, True]


class Gadget:
    """Pickles as a call of ``function(*args)``: what a malicious file would hold."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def test_a_file_that_would_run_code_is_refused(tmp_path, environment):
    canary = tmp_path / "CANARY"
    path = tmp_path / "evil.pt"
    evil = {"weights": torch.zeros(2), "payload": Gadget(open, str(canary), "w")}
    with pytest.raises(SetupError, match="was not written.*io.open.*add_safe_globals"):
        atomic_save(evil, path)  # refused when it is saved, not only when the job is gone
    assert not path.exists() and not canary.exists()
    # a file that some other writer put there, and that the manifest vouches for, is refused too
    RunWriter(tmp_path).save_files({"evil.pt": (lambda f: torch.save(evil, f), {"kind": "user"})})
    with pytest.raises(UnsafeCheckpointError, match="add_safe_globals"):
        verified_load(path)
    assert not canary.exists()


def test_atomic_save_admits_what_verified_load_admits(tmp_path):
    """The fix the refusal suggests works: classes registered with add_safe_globals are saved and loaded back."""
    path = tmp_path / "point.pt"
    with pytest.raises(SetupError, match="add_safe_globals"):
        atomic_save({"where": Point(1, 2)}, path)
    with torch.serialization.safe_globals([Point]):
        atomic_save({"where": Point(1, 2)}, path)
        assert verified_load(path)["where"] == Point(1, 2)


def test_a_file_without_a_manifest_record_fails_closed(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save(state(1), plain)
    with pytest.raises(CorruptCheckpointError, match="no manifest beside it"):
        verified_load(plain)
    atomic_save(state(2), tmp_path / "other.pt")  # now there is a manifest, without a record of plain.pt
    with pytest.raises(CorruptCheckpointError, match="has no record of it") as excinfo:
        verified_load(plain)
    assert str(plain) in str(excinfo.value) and "atomic_save" in str(excinfo.value)


def test_missing_files_are_not_found(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        verified_load(tmp_path / "nowhere" / "ckpt.pt")
    path = tmp_path / "ckpt.pt"
    with pytest.raises(FileNotFoundError):
        verified_load(path)
    atomic_save(state(1), path)
    atomic_save(state(2), path)
    os.remove(path)
    assert verified_load(path)["step"] == 1
    os.remove(tmp_path / "ckpt.prev.pt")
    with pytest.raises(CheckpointNotFoundError, match="deleted"):
        verified_load(path)


def test_failed_write_leaves_everything_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save(state(1), path)
    atomic_save(state(2), path)
    before = snapshot_directory(tmp_path)

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(archive, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match="No space left"):
        atomic_save(state(3), path)
    monkeypatch.undo()
    assert snapshot_directory(tmp_path) == before
    assert verified_load(path, strict=True)["step"] == 2


@pytest.mark.parametrize("name", [run_manifest.MANIFEST_NAME, LOCK_NAME, "ckpt.prev.pt"])
def test_names_of_the_library_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="another name|without '.prev'"):
        atomic_save(state(1), tmp_path / name)
    assert not os.path.exists(tmp_path / name)


def test_an_unreadable_manifest_is_replaced_on_save(tmp_path, caplog):
    (tmp_path / run_manifest.MANIFEST_NAME).write_text("not json")
    with caplog.at_level(logging.WARNING, logger="experiment_io.standalone"):
        atomic_save(state(1), tmp_path / "ckpt.pt")
    assert "unreadable manifest" in caplog.text
    assert verified_load(tmp_path / "ckpt.pt")["step"] == 1


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_vouched_garbage_raises_a_library_error(tmp_path, data):
    """With the manifest forged to vouch for any bytes, the load still fails only with a library error."""
    path = tmp_path / "fuzz.pt"
    atomic_save(state(1), path)
    path.write_bytes(data)
    rewrite_manifest(tmp_path, lambda files: files["fuzz.pt"].update(verification.file_digest(path).as_dict()))
    try:
        verified_load(path, strict=True)
    except ExperimentIOError:
        pass


def doc_script():
    """The first Python example of docs/own_loop.rst."""
    rst = open(os.path.join(os.path.dirname(__file__), os.pardir, "docs", "own_loop.rst")).read()
    block = rst.split(".. code-block:: python\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines)


def run_doc_script(script, directory, monkeypatch):
    """Run the script in this process (no second torch import), in ``directory``."""
    rng = get_rng_state()
    directory.mkdir(exist_ok=True)
    monkeypatch.chdir(directory)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        set_rng_state(rng)


@pytest.mark.slow
def test_the_documented_loop_resumes_bit_for_bit_after_a_kill(tmp_path, monkeypatch, capsys):
    """docs/own_loop.rst's script, killed mid-epoch 10 steps after a save, ends where an uninterrupted run does."""
    script = tmp_path / "own_loop.py"
    script.write_text(doc_script())
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run_doc_script(script, uninterrupted, monkeypatch)

    def killed_job(report):
        os.setpgrp()  # the job's processes: this one and its loader workers, killed together
        advance, count = ResumableSampler.advance, [0]

        def advance_then_die(self, n):
            advance(self, n)
            count[0] += 1
            if count[0] == 50:
                os.killpg(0, signal.SIGKILL)

        ResumableSampler.advance = advance_then_die
        os.chdir(resumed)
        runpy.run_path(str(script), run_name="__main__")

    resumed.mkdir()
    pid, _ = fork_child(killed_job)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    lock = RunLock(str(resumed / "checkpoints"))
    for _ in range(100):  # the killed workers release the lock they inherited as they die
        try:
            lock.acquire().release()
            break
        except RunLockedError:
            time.sleep(0.05)
    capsys.readouterr()
    run_doc_script(script, resumed, monkeypatch)
    output = capsys.readouterr().out
    assert "resuming at step 40, epoch 1, sample 256" in output, output  # 32 batches an epoch: step 40 is mid-epoch

    a = verified_load(uninterrupted / "checkpoints" / "checkpoint.pt", strict=True)
    b = verified_load(resumed / "checkpoints" / "checkpoint.pt", strict=True)
    assert a["step"] == b["step"] == 5 * 32
    for key in ("model", "optimizer", "sampler"):
        assert_bitwise_equal(a[key], b[key])


# --- atomic_save(..., async_save=True) ------------------------------------------------


def test_async_save_writes_the_object_as_it_was_when_the_call_returned(tmp_path):
    path = tmp_path / "ckpt.pt"
    obj, expected = state(1), state(1)
    pending = atomic_save(obj, path, async_save=True)
    with torch.no_grad():
        obj["model"]["weight"].add_(1.0)
        obj["optimizer"]["state"][0]["exp_avg"].zero_()
    obj["history"].append("later")
    record = pending.wait()
    assert pending.done()
    assert record.digest == manifest_files(tmp_path)["ckpt.pt"]["digest"]
    assert_bitwise_equal(verified_load(path, strict=True), expected)
    atomic_save(expected, tmp_path / "sync.pt")
    assert (tmp_path / "sync.pt").read_bytes() == path.read_bytes()


def test_async_saves_follow_each_other_and_rotate_generations(tmp_path):
    path = tmp_path / "ckpt.pt"
    pendings = [atomic_save(state(s), path, async_save=True) for s in range(5)]
    assert all(p.done() for p in pendings[:-1])  # each save waited for the previous to commit
    pendings[-1].wait()
    assert_bitwise_equal(verified_load(path, strict=True), state(4))
    assert_bitwise_equal(torch.load(tmp_path / "ckpt.prev.pt", weights_only=True), state(3))


def test_async_save_errors_are_raised_by_wait_or_the_next_save(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save(state(1), path)
    before = snapshot_directory(tmp_path)
    real_save = archive.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(archive, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match="No space left"):
        atomic_save(state(2), path, async_save=True).wait()
    failed = atomic_save(state(3), path, async_save=True)
    while not failed.done():  # it has failed before anyone waits for it
        time.sleep(0.001)
    with pytest.raises(CheckpointWriteError, match="No space left"):
        failed.wait()
    with pytest.raises(CheckpointWriteError, match="No space left"):
        failed.wait()  # as often as asked
    # wait() raised that error, so this call does not raise it again; nobody waits for this one...
    atomic_save(state(3), path, async_save=True)
    with pytest.raises(CheckpointWriteError, match="No space left"):
        atomic_save(state(4), path, async_save=True)  # ...so the next save raises its error
    monkeypatch.setattr(archive, "save", real_save)
    assert snapshot_directory(tmp_path) == before
    assert verified_load(path, strict=True)["step"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["normal", "ctrl-c"])
def test_the_process_exits_only_after_the_async_save_committed(tmp_path, ending):
    import subprocess
    import sys
    import textwrap
    path = tmp_path / "big.pt"
    script = textwrap.dedent(f"""
        import os, signal, time, torch
        # Ctrl-C as a terminal delivers it, whatever disposition or mask this process inherited from its parent
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
        from experiment_io import atomic_save
        atomic_save({{"x": torch.arange(32 * 2**20, dtype=torch.float32)}}, {str(path)!r}, async_save=True)
        # the script ends here, while the background thread writes 128 MiB
        if {ending == "ctrl-c"}:
            os.kill(os.getpid(), signal.SIGINT)
            while True:  # not signal.pause(): the signal may be taken by one of torch's threads, which wakes no pause
                time.sleep(0.05)
    """)
    done = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True, text=True)
    if ending == "normal":
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode != 0 and "KeyboardInterrupt" in done.stderr
    loaded = verified_load(path, strict=True)
    assert torch.equal(loaded["x"], torch.arange(32 * 2**20, dtype=torch.float32))


def test_loads_while_another_writer_saves_see_whole_committed_states(tmp_path):
    """A reader racing a writer gets a state that was committed, never a mixture, never an error."""
    path = tmp_path / "ckpt.pt"
    atomic_save(state(0, n=4096), path)

    def write():
        from experiment_io import AtomicSaver
        saver = AtomicSaver()  # its own writer, as another process would have
        for step in range(1, 100):
            saver.save(state(step, n=4096), path)
            time.sleep(0.002)  # a training step between saves

    def load():
        loaded = verified_load(path)
        assert_bitwise_equal(loaded, state(loaded["step"], n=4096))

    loads, failures = race(write, load)
    assert not failures, failures
    assert loads > 0


@pytest.mark.slow
def test_an_async_error_nobody_waited_for_is_shown_at_exit(tmp_path):
    script = (
        "import os\n"
        "from experiment_io import atomic_save\n"
        "from experiment_io.storage import atomic as storage\n"
        "def full(step, path):\n"
        "    if step == 'written':\n"
        "        raise OSError(28, 'No space left on device')\n"
        "hook = storage.observe_write_steps(full); hook.__enter__()\n"
        f"atomic_save({{'x': 1}}, {str(tmp_path / 'a.pt')!r}, async_save=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "nothing waited for it" in proc.stderr and "No space left on device" in proc.stderr, proc.stderr
