"""Power loss during a save: every state a crash could leave on disk loads the newest committed checkpoint, or the one before.

A save is recorded as the operations the file system sees (a temporary file
created and written, its fsync, the renames, the directory fsync), through the
write protocol's hook. A power loss keeps, of the renames since the last
directory fsync, any prefix (a journal persists metadata in order), and of a file
whose data was not fsynced, nothing (it is empty). Every such state is rebuilt
in a directory of its own and loaded; in the style of ALICE and CrashMonkey.
"""
import os
import shutil


from experiment_io.storage import atomic as storage
from experiment_io.storage.generations import base_name
from experiment_io.storage.manifest import MANIFEST_NAME

from helpers import build_run, load_crash_state, saver


def snapshot(directory):
    return {name: (directory / name).read_bytes() for name in os.listdir(directory) if (directory / name).is_file()}


class Recorder:
    """Turns the write protocol's steps into file-system operations, and replays crash states."""

    def __init__(self, directory, durable):
        self.directory = directory
        self.durable = dict(durable)  # what survives a power loss: name -> bytes
        self.pending = []  # metadata operations since the last directory fsync, in order
        self.synced = set()  # temporary files whose data is durable
        self.states = []  # crash states: the durable state and the pending operations at each instant

    def __call__(self, step, path):
        name = os.path.basename(path)
        if step == "written":  # the temporary file was created (metadata) and written (data, not durable)
            self.pending.append(("create", name, (self.directory / name).read_bytes()))
        elif step == "fsynced":
            self.synced.add(name)
        elif step == "rotated":
            self.pending.append(("rename", base_name(name), name))
        elif step == "replaced":
            self.pending.append(("rename", self._temporary_of(name), name))
        elif step == "directory_fsynced":
            self.durable = self._apply(self.durable, self.pending)
            self.pending = []
        self.states.append((dict(self.durable), list(self.pending), set(self.synced)))

    def _temporary_of(self, name):
        """The temporary file renamed to ``name``: created since the last directory fsync, or before it (the
        manifest's is created with the files, and renamed once their renames are durable)."""
        created = [op[1] for op in reversed(self.pending) if op[0] == "create"] + list(self.durable)
        return next(temporary for temporary in created if temporary.startswith(f".{name}."))

    def _apply(self, state, operations, synced=None):
        state = dict(state)
        for op in operations:
            if op[0] == "create":
                content = op[2] if synced is None or op[1] in synced else b""
                state[op[1]] = content
            elif op[0] == "rename" and op[1] in state:
                state[op[2]] = state.pop(op[1])
        return state

    def crash_states(self):
        """Every on-disk state a power loss could leave, each once."""
        seen = set()
        for durable, pending, synced in self.states:
            for kept in range(len(pending) + 1):
                state = self._apply(durable, pending[:kept], synced)
                key = tuple(sorted((n, hash(c)) for n, c in state.items()))
                if key not in seen:
                    seen.add(key)
                    yield state


def test_every_state_a_power_loss_leaves_loads_a_committed_checkpoint(tmp_path):
    run = tmp_path / "run"
    save, database = build_run(str(run))
    for step in range(1, 6):
        save(step)
    committed_before = 5
    recorder = Recorder(run, snapshot(run))
    with storage.observe_write_steps(recorder):
        saver(str(run))(6)  # step 6 writes last, best and best model (a better epoch) and the manifest
    states = list(recorder.crash_states())
    assert len(states) > 10, "the save was not recorded"
    assert any(content == b"" for state in states for content in state.values()), "no state lost unsynced data"
    loaded_steps = set()
    for index, state in enumerate(states):
        directory = tmp_path / f"crash{index}"
        step = load_crash_state(directory, state, database, f"crash state {index}")
        manifest = state.get(MANIFEST_NAME, b"")
        new_manifest_durable = b'"step": 6' in manifest
        assert step == (6 if new_manifest_durable else committed_before), f"crash state {index} loaded step {step}"
        loaded_steps.add(step)
        shutil.rmtree(directory)
    assert loaded_steps == {committed_before, 6}, "both the old and the new commit must occur among the states"
