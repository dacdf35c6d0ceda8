"""Fixtures shared by the tests, and the CUDA skip."""
import contextlib
import shutil
import sys
import textwrap

import pytest
import torch

from experiment_io.storage import atomic as storage

from helpers import build_run


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def background_saves_for_any_size(monkeypatch):
    """Tests of async_save run with tiny models: let every save go to the background writer, as a large one does
    (``checkpointing.ASYNC_MIN_BYTES`` keeps small saves synchronous otherwise; one test checks that rule)."""
    from experiment_io.training import checkpointing
    monkeypatch.setattr(checkpointing, "ASYNC_MIN_BYTES", 0)


@pytest.fixture
def write_steps():
    """``write_steps(observer)`` calls ``observer(step, path)`` at each step of every save until the test ends.

    The one hook of the write protocol (:func:`experiment_io.storage.atomic.observe_write_steps`):
    an observer that raises or sleeps at a step injects a fault or a delay there.
    """
    with contextlib.ExitStack() as stack:
        yield lambda observer: stack.enter_context(storage.observe_write_steps(observer))


@pytest.fixture(params=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def environment(request, monkeypatch):
    """Each test runs twice: as is, and with the variable that would weaken ``weights_only`` if it were honoured."""
    if request.param != "default":
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return request.param


@pytest.fixture
def canary_module(tmp_path, monkeypatch):
    """``(name, canary)``: a module on ``sys.path``, not imported, that creates the file ``canary`` when imported.

    It defines ``Net`` (a module) and ``MyDatabase`` (a restartable database).
    """
    name = "eio_canary_mod"
    canary = tmp_path / "IMPORTED"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{name}.py").write_text(textwrap.dedent(f"""
        import torch
        open({str(canary)!r}, "w").close()
        from experiment_io import NPZDatabase

        class Net(torch.nn.Module):
            pass

        class MyDatabase(NPZDatabase):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name, canary
    sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """``(directory, database)``: a run with every generation, steps 1..7, a better model at steps 3 and 6.

    Shared by the tests of a module: damage a copy (:func:`run_copy`), not this.
    """
    directory = tmp_path_factory.mktemp("saved")
    save, database = build_run(str(directory))
    for step in range(1, 8):
        save(step)
    return directory, database


@pytest.fixture
def run_copy(saved_run, tmp_path):
    """``(directory, database)``: a private copy of :func:`saved_run` to damage."""
    directory, database = saved_run
    target = tmp_path / "run"
    shutil.copytree(directory, target)
    return target, database


@pytest.fixture
def fast_paths_on(monkeypatch):
    """A test of a fast path itself: the fast paths on, whatever ``EXPERIMENT_IO_FAST_PATHS`` the run was given
    (CI runs the storage, reliability and resume tests a second time with them off)."""
    monkeypatch.setenv("EXPERIMENT_IO_FAST_PATHS", "1")
