"""Hostile run directories: planted links, special files, forged manifests. Nothing followed, nothing hangs."""
import contextlib
import json
import os
import signal
import time

import pytest
import torch

from experiment_io import SetupParams, load_checkpoint_from_cwd, load_model_from_cwd, setup_training, train_model, verified_load
from experiment_io.storage import atomic as storage
from experiment_io.storage.manifest import MANIFEST_NAME, read_manifest
from experiment_io.frontends.cli import main
from experiment_io.errors import CheckpointWriteError, CorruptCheckpointError, ExperimentIOError
from experiment_io.storage.lock import LOCK_NAME
from experiment_io.run.payloads import BEST_MODEL_NAME, LAST_NAME

from helpers import make_database, make_training_modules, race, rewrite_manifest, train_tiny_run


@contextlib.contextmanager
def deadline(seconds):
    """Fail instead of hanging."""
    def expired(signum, frame):
        raise AssertionError(f"still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def run(saved_run, tmp_path):
    """A copy of a trained run directory and its database."""
    import shutil
    directory, database = saved_run
    shutil.copytree(directory, tmp_path / "run")
    return tmp_path / "run", database


def every_reader(directory, database):
    """Each loader and CLI command on ``directory``; yields what each returned or raised."""
    for name, call in (
        ("load_checkpoint_from_cwd", lambda: load_checkpoint_from_cwd(directory=str(directory), database=database)),
        ("load_model_from_cwd", lambda: load_model_from_cwd(directory=str(directory))),
        ("verify", lambda: main(["verify", str(directory)])),
        ("info", lambda: main(["info", str(directory)])),
        ("metrics", lambda: main(["metrics", str(directory)])),
    ):
        try:
            yield name, call()
        except ExperimentIOError as e:
            yield name, e


def test_a_planted_lock_link_destroys_nothing(tmp_path):
    victim = tmp_path / "important.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / LOCK_NAME)
    with pytest.raises(CheckpointWriteError, match="symbolic link.*remove it"):
        train_tiny_run(run)
    assert victim.read_text() == "precious"
    os.remove(run / LOCK_NAME)  # the fix the message gives
    train_tiny_run(run)
    assert victim.read_text() == "precious" and read_manifest(str(run))[1].get(LAST_NAME) is not None


def test_a_planted_lock_hard_link_destroys_nothing(tmp_path):
    run = tmp_path / "run"
    train_tiny_run(run)
    manifest = (run / MANIFEST_NAME).read_bytes()
    os.remove(run / LOCK_NAME)
    os.link(run / MANIFEST_NAME, run / LOCK_NAME)
    with pytest.raises(CheckpointWriteError, match="hard link.*remove it"):
        train_tiny_run(run)
    assert (run / MANIFEST_NAME).read_bytes() == manifest
    os.remove(run / LOCK_NAME)  # the fix the message gives; the run is then resumed
    check = load_checkpoint_from_cwd(directory=str(run), database=make_database())
    train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, max_epochs=3)
    assert read_manifest(str(run))[1][LAST_NAME]["epochs_done"] == 3


def test_a_planted_temporary_link_is_not_written_through(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    monkeypatch.setattr(storage.secrets, "token_hex", lambda n: "0" * (2 * n))
    target = tmp_path / "ckpt.pt"
    os.symlink(victim, storage._temporary_path(str(target)))
    with pytest.raises(CheckpointWriteError):
        storage.atomic_write_bytes(target, b"new bytes")
    assert victim.read_text() == "precious" and not target.exists()


@pytest.mark.parametrize("stem", ["c" * 247, "é" * 123 + "c"])
def test_a_name_of_250_bytes_is_saved_rotated_and_loaded(tmp_path, stem):
    from experiment_io import atomic_save
    path = tmp_path / (stem + ".pt")
    assert len(os.fsencode(path.name)) == 250
    for step in (1, 2, 3):
        atomic_save({"step": step}, path)
    assert verified_load(path)["step"] == 3
    with pytest.raises(ValueError, match="at most 250"):
        atomic_save({"step": 1}, tmp_path / ("c" * 248 + ".pt"))


def test_a_write_into_a_removed_directory_says_so(tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    os.rmdir(gone)
    with pytest.raises(CheckpointWriteError, match="no longer exists"):
        storage.atomic_write_bytes(gone / "a.pt", b"x")


def test_a_flipped_bit_in_the_manifest_is_detected(run):
    directory, database = run
    path = directory / MANIFEST_NAME
    text = path.read_text()
    at = text.index('"step": ') + len('"step": ')
    path.write_text(text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1:])  # a step value changed by one digit
    with pytest.raises(CorruptCheckpointError, match="digest of its own content"):
        load_checkpoint_from_cwd(directory=str(directory), database=database)
    assert main(["verify", str(directory)]) == 1


@pytest.mark.parametrize("field, value", [("step", None), ("step", "24"), ("step", [1]), ("size", -1),
                                          ("written_at", float("inf")), ("kind", {"a": 1})])
def test_a_forged_manifest_value_is_a_corrupt_checkpoint_naming_the_field(run, field, value):
    directory, database = run
    doc = json.loads((directory / MANIFEST_NAME).read_text())
    doc["files"][LAST_NAME][field] = value
    del doc["header"]["digest"]  # a forger who knows to drop the digest
    (directory / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match=repr(field)):
        load_checkpoint_from_cwd(directory=str(directory), database=database)


@pytest.mark.parametrize("content", [b"[" * 100000, b'{"header": ' * 50000])
def test_deeply_nested_manifest_json(run, content):
    directory, database = run
    (directory / MANIFEST_NAME).write_bytes(content)
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint_from_cwd(directory=str(directory), database=database)


@pytest.mark.parametrize("name", ["/dev/zero", "../../../../etc/passwd", "..", "a/b.pt"])
def test_manifest_names_outside_the_directory_are_refused(run, name):
    directory, database = run
    rewrite_manifest(directory, lambda files: files.update({name: {"size": 1, "digest": "xxh3_128:00"}}))
    with deadline(20):
        for command, outcome in every_reader(directory, database):
            assert isinstance(outcome, (ExperimentIOError, int)), (command, outcome)
            if isinstance(outcome, int):
                assert outcome == 1, command


def special_file(kind, path):
    if kind == "symlink to /dev/zero":
        os.symlink("/dev/zero", path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "symlink loop":
        os.symlink(path, path)


@pytest.mark.parametrize("kind", ["symlink to /dev/zero", "fifo", "directory", "symlink loop"])
@pytest.mark.parametrize("name", [LAST_NAME, BEST_MODEL_NAME, MANIFEST_NAME])
def test_special_files_are_never_read_and_nothing_hangs(run, kind, name):
    directory, database = run
    os.remove(directory / name)
    special_file(kind, directory / name)
    before = {n: (directory / n).read_bytes() for n in os.listdir(directory) if (directory / n).is_file()
              and not (directory / n).is_symlink()}
    started = time.monotonic()
    with deadline(30):
        for command, outcome in every_reader(directory, database):
            assert not isinstance(outcome, Exception) or isinstance(outcome, ExperimentIOError), (command, outcome)
    assert time.monotonic() - started < 30
    after = {n: (directory / n).read_bytes() for n in before}
    assert after == before, "a reader modified a file"


def test_verified_load_of_a_special_file(tmp_path):
    from experiment_io import atomic_save
    path = tmp_path / "ckpt.pt"
    atomic_save({"w": torch.ones(3)}, path)
    os.remove(path)
    os.mkfifo(path)
    with deadline(10), pytest.raises(ExperimentIOError):
        verified_load(path)


def test_a_manifest_that_is_a_directory(run):
    directory, database = run
    os.remove(directory / MANIFEST_NAME)
    os.mkdir(directory / MANIFEST_NAME)
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint_from_cwd(directory=str(directory), database=database)


def test_cli_metrics_on_a_file_the_manifest_vouches_for_prints_an_error(run, capsys):
    directory, _ = run
    path = directory / LAST_NAME
    path.write_bytes(b"PK\x03\x04 not really a zip")
    from experiment_io.storage import verification
    rewrite_manifest(directory, lambda files: files[LAST_NAME].update(verification.file_digest(path).as_dict()))
    assert main(["metrics", str(directory)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "Traceback" not in captured.err


def test_info_survives_absurd_times(run, capsys):
    directory, _ = run
    rewrite_manifest(directory, lambda files: files[LAST_NAME].update(written_at=1e300))
    assert main(["info", str(directory)]) == 0
    assert LAST_NAME in capsys.readouterr().out


def test_a_loaded_model_does_not_change_when_the_file_is_changed_in_place(run):
    directory, _ = run
    model = load_model_from_cwd(directory=str(directory))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = directory / BEST_MODEL_NAME
    with open(path, "r+b") as f:  # an in-place rewrite (rsync --inplace, cp over the file)
        data = bytearray(f.read())
        f.seek(0)
        f.write(bytes(b ^ 0xFF for b in data))
    os.truncate(path, 10)  # would be SIGBUS for a mapped model
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def rollback_by_copy(directory):
    import shutil
    shutil.copy(directory / "last_checkpoint.prev.pt", directory / LAST_NAME)  # a restore of an older copy


def test_a_silent_rollback_is_loud(run, capsys):
    directory, database = run
    committed = read_manifest(str(directory))[1][LAST_NAME]["step"]
    rollback_by_copy(directory)
    script = ("import sys; sys.path.insert(0, %r); import helpers\n"
              "from experiment_io import load_checkpoint_from_cwd\n"
              "check = load_checkpoint_from_cwd(directory=%r, database=helpers.make_database())\n"
              "print('STEP', check['controller'].position.step)\n") % (os.path.dirname(__file__), str(directory))
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = int(proc.stdout.split("STEP")[1])
    assert loaded < committed
    assert "older one" in proc.stderr and f"step {committed}" in proc.stderr  # seen with no logging configured
    assert main(["verify", str(directory)]) == 3
    assert "OLDER" in capsys.readouterr().out
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint_from_cwd(directory=str(directory), database=database, strict=True)


def test_a_lock_removed_while_held_stops_the_holder_before_it_writes(tmp_path):
    from experiment_io import train_model
    from experiment_io.errors import RunLockedError

    tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=16,
                                                                                  max_epochs=2))
    batches = []

    def clean_up_stale_lock(*_):
        batches.append(1)
        if len(batches) == 3:
            os.remove(tmp_path / LOCK_NAME)  # someone's "stale lock" clean-up

    with pytest.raises(RunLockedError, match="removed or replaced"):
        train_model(tm, make_database(), controller, tracker, None, [clean_up_stale_lock], quiet=True,
                    directory=str(tmp_path), checkpoint_every_batches=4)
    assert read_manifest(str(tmp_path))[1].get(LAST_NAME) is None  # nothing written after the loss
    # the fix the message gives: with one job training there, resume from the last checkpoint (none yet: start)
    check = load_checkpoint_from_cwd(directory=str(tmp_path), database=make_database(), missing_ok=True)
    if check is None:
        tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=16,
                                                                                      max_epochs=2))
        check = {"training_modules": tm, "controller": controller, "metric_tracker": tracker, "database": make_database()}
    train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, directory=str(tmp_path))
    assert read_manifest(str(tmp_path))[1][LAST_NAME]["epochs_done"] == 2


@pytest.mark.slow
def test_a_forked_child_neither_keeps_the_lock_nor_the_stop_handler(tmp_path):
    """The trainer forks a worker and is SIGKILLed: the lock is free; SIGTERM ends the worker at once."""
    import subprocess
    import sys
    script = (
        "import os, signal, sys, time\n"
        "from experiment_io import RunLock\n"
        "from experiment_io.training.preemption import Preemption\n"
        f"lock = RunLock({str(tmp_path)!r}).acquire()\n"
        "with Preemption():\n"
        "    child = os.fork()\n"
        "    if child == 0:\n"
        "        time.sleep(60); os._exit(0)\n"
        "    print(child, flush=True)\n"
        "    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        holder.kill()
        holder.wait()
        from experiment_io import RunLock
        RunLock(str(tmp_path)).acquire().release()  # free although the child lives
        os.kill(child, signal.SIGTERM)  # the default action: the worker ends (it would ignore it with the handler)
        with pytest.raises(ProcessLookupError):
            for _ in range(50):
                os.kill(child, 0)
                time.sleep(0.1)
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_deflate_bomb_is_refused_before_it_is_decompressed(run):
    import zipfile
    directory, database = run
    path = directory / LAST_NAME
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (64 * 1024 * 1024))  # 64 MiB of zeros in a few KB
    assert path.stat().st_size < 1024 * 1024
    from experiment_io.storage import verification
    rewrite_manifest(directory, lambda files: files[LAST_NAME].update(verification.file_digest(path).as_dict()))
    started = time.monotonic()
    for command, outcome in every_reader(directory, database):
        assert not isinstance(outcome, Exception) or isinstance(outcome, ExperimentIOError), (command, outcome)
    assert time.monotonic() - started < 20
    with pytest.raises(ExperimentIOError, match="compressed"):  # refused for being compressed, not decompressed
        verification.check_archive(path)


def test_a_refused_structure_file_imports_nothing(run):
    """A structure file naming a class of a torch module not imported (torch._inductor: hundreds of modules)."""
    import io
    import pickle
    import subprocess
    import sys
    from experiment_io.storage import verification
    from experiment_io.run.payloads import STRUCTURE_NAME

    directory, _ = run

    class Planted:
        pass

    Planted.__module__, Planted.__qualname__ = "torch._inductor.codecache", "Planted"

    bait = object()

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            return (Planted, ()) if obj is bait else NotImplemented

    import types
    fake = types.ModuleType("torch._inductor.codecache")  # only while this process writes the file
    fake.Planted = Planted
    saved = {name: sys.modules.get(name) for name in ("torch._inductor.codecache",)}
    sys.modules["torch._inductor.codecache"] = fake
    try:
        buffer = io.BytesIO()
        torch.save({"experiment_io": {"kind": "structure", "format_version": 2}, "x": bait}, buffer,
                   pickle_module=type("M", (), {"Pickler": Pickler, "Unpickler": pickle.Unpickler, "__name__": "pickle"}))
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    path = directory / STRUCTURE_NAME
    path.write_bytes(buffer.getvalue())
    rewrite_manifest(directory, lambda files: files[STRUCTURE_NAME].update(verification.file_digest(path).as_dict()))
    script = ("import sys\n"
              "from experiment_io.run.trust import load_structure\n"
              "from experiment_io.errors import UnsafeCheckpointError\n"
              "try:\n    load_structure(%r)\n"
              "except UnsafeCheckpointError as e:\n    print('REFUSED', e)\n"
              "print('IMPORTED' if 'torch._inductor' in sys.modules else 'NOTHING IMPORTED')\n"
              ) % str(path)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "REFUSED" in proc.stdout and "torch._inductor.codecache.Planted" in proc.stdout, proc.stdout + proc.stderr
    assert "NOTHING IMPORTED" in proc.stdout


@pytest.mark.slow
def test_loads_while_train_model_writes_succeed(tmp_path):
    """A reader racing a live writer gets a committed checkpoint, never a 'not a checkpoint' error."""
    from experiment_io import train_model

    database = make_database(n=400)
    tm, controller, tracker = setup_training(make_training_modules(), SetupParams(stopping_key="mse", batch_size=8,
                                                                                  max_epochs=3))
    train_model(tm, database, controller, tracker, None, None, quiet=True, directory=str(tmp_path))  # a first run
    controller.max_epochs = 8
    def train():
        train_model(tm, database, controller, tracker, None, None, quiet=True, directory=str(tmp_path),
                    checkpoint_every_batches=1)

    def load():
        check = load_checkpoint_from_cwd(directory=str(tmp_path), database=database, restore_rng=False)
        assert check["controller"].position.step >= 0

    loads, failures = race(train, load)
    assert not failures and loads > 0


# --- a fuzzer of hostile run directories ----------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from experiment_io.run.payloads import BEST_NAME, STRUCTURE_NAME
from experiment_io.storage.manifest import MANIFEST_NAME
from test_security import plant_structure

TARGETS = [LAST_NAME, "last_checkpoint.prev.pt", BEST_NAME, BEST_MODEL_NAME, STRUCTURE_NAME, MANIFEST_NAME]
ACTIONS = ["keep", "delete", "link outside", "link to /dev/zero", "fifo", "directory", "truncate", "garbage",
           "link loop", "gadget: a constructor", "gadget: growth"]
ABSURD = [None, "24", [1], {"a": 1}, -5, 10**30, 1e300, float("nan"), "../x", "/dev/zero", True]


def plant(directory, outside, name, action):
    path = directory / name
    if action == "keep":
        return
    if action.startswith("gadget"):  # whatever name was drawn: the structure file, vouched for by the manifest
        from test_security import Doubling, Gadget
        gadget = Gadget(torch.nn.Linear, 20000, 20000) if action == "gadget: a constructor" else Doubling(28)
        if (directory / MANIFEST_NAME).is_file() and not (directory / MANIFEST_NAME).is_symlink():
            with contextlib.suppress(ExperimentIOError, OSError, ValueError, KeyError):
                plant_structure(directory, gadget)
        return
    if path.exists() or path.is_symlink():
        if path.is_dir() and not path.is_symlink():
            os.rmdir(path)
        else:
            os.remove(path)
    if action == "link outside":
        os.symlink(outside / "secret.pt", path)
    elif action == "link to /dev/zero":
        os.symlink("/dev/zero", path)
    elif action == "link loop":
        os.symlink(path, path)
    elif action == "fifo":
        os.mkfifo(path)
    elif action == "directory":
        os.mkdir(path)
    elif action == "truncate":
        path.write_bytes(b"PK\x03\x04")
    elif action == "garbage":
        path.write_bytes(os.urandom(300))


@contextlib.contextmanager
def opened_files():
    """Record the real path of every file opened with os.open while inside."""
    real_open, seen = os.open, []

    def recording_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        try:
            seen.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
        return fd

    os.open = recording_open
    try:
        yield seen
    finally:
        os.open = real_open


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(plan=st.lists(st.tuples(st.sampled_from(TARGETS), st.sampled_from(ACTIONS)), min_size=1, max_size=4),
       forge=st.lists(st.tuples(st.sampled_from(["step", "size", "written_at", "digest", "kind", "@name"]),
                                st.sampled_from(ABSURD)), max_size=2))
def test_hostile_directories_fuzzed(saved_run, tmp_path_factory, plan, forge):
    import shutil
    source, database = saved_run
    base = tmp_path_factory.mktemp("hostile")
    directory, outside = base / "run", base / "outside"
    shutil.copytree(source, directory)
    outside.mkdir()
    shutil.copy(source / LAST_NAME, outside / "secret.pt")
    if forge and not any(name == MANIFEST_NAME and action != "keep" for name, action in plan):
        doc = json.loads((directory / MANIFEST_NAME).read_text())
        for field, value in forge:
            if field == "@name":
                doc["files"][str(value)] = doc["files"][LAST_NAME]
            else:
                doc["files"][LAST_NAME][field] = value
        doc["header"].pop("digest", None)
        (directory / MANIFEST_NAME).write_text(json.dumps(doc))
    for name, action in plan:
        plant(directory, outside, name, action)
    before = {n: (directory / n).read_bytes() for n in os.listdir(directory)
              if (directory / n).is_file() and not (directory / n).is_symlink()}
    started = time.monotonic()
    with deadline(60), opened_files() as seen:
        for command, outcome in every_reader(directory, database):
            assert not isinstance(outcome, Exception) or isinstance(outcome, ExperimentIOError), (command, outcome)
    assert time.monotonic() - started < 60
    assert not [p for p in seen if p.startswith(str(outside)) or p.startswith("/dev/")], "read outside the run"
    after = {n: (directory / n).read_bytes() for n in before}
    assert after == before, "a reader modified a file"


def test_write_side_errors_are_library_errors_naming_the_cause(tmp_path):
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(CheckpointWriteError, match="cannot create the run directory"):
        train_tiny_run(tmp_path / "file" / "run")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).mkdir()  # a lock path that is a directory
    with pytest.raises(CheckpointWriteError, match="directory"):
        train_tiny_run(run)
