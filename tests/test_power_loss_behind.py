"""Power loss while saves are made durable behind the loop (``train_model``'s saves).

A save is committed when its files and its manifest are renamed into place, and made
durable (fsync of each file, then of the directory) in a thread behind the loop; the
next save waits for that before it rotates the generation. Every operation the file
system sees is recorded with the inode it concerns; a power loss keeps, of the
renames since the last directory fsync, any prefix (in order), and of an inode whose
data was not fsynced, nothing (an empty file). Every such state is rebuilt and
loaded: it must load the newest save or the one before it, never an older one, and a
state after a save's durability has finished must load that save.
"""
import os
import shutil
import subprocess
import sys


from experiment_io.storage import atomic as storage
from experiment_io.storage.generations import base_name
from experiment_io.storage.manifest import MANIFEST_NAME, PREVIOUS_MANIFEST_NAME

from helpers import build_run, load_crash_state, saver


class InodeRecorder:
    """The names of a directory as inodes, what of them is durable, and the crash states of each instant."""

    def __init__(self, directory):
        self.directory = directory
        self.data, self.synced = {}, set()
        self.live = {}  # name -> inode, every operation applied
        for name in os.listdir(directory):
            if (directory / name).is_file():
                self.live[name] = self._inode((directory / name).read_bytes(), synced=True)
        self.durable = dict(self.live)  # name -> inode as a power loss keeps them
        self.pending = []  # renames and creations since the last directory fsync
        self.states = []  # (save being made, durable names, pending, synced inodes, whether the save is durable)
        self.save, self.save_durable = None, False

    def _inode(self, content, *, synced):
        inode = len(self.data)
        self.data[inode] = content
        if synced:
            self.synced.add(inode)
        return inode

    def _rename(self, source, target):
        self.live[target] = self.live.pop(source)
        self.pending.append((source, target))

    def __call__(self, step, path):
        name = os.path.basename(path)
        if step == "written":
            inode = self._inode((self.directory / name).read_bytes(), synced=False)
            self.live[name] = inode
            self.pending.append((None, name, inode))
        elif step == "fsynced":
            self.synced.add(self.live[name])
        elif step == "rotated":
            self._rename(base_name(name) if name != PREVIOUS_MANIFEST_NAME else MANIFEST_NAME, name)
        elif step == "replaced":
            self._rename(next(n for n in self.live if n.startswith(f".{name}.")), name)
        elif step == "directory_fsynced":
            self.durable, self.pending = dict(self.live), []
            if all(inode in self.synced for inode in self.live.values()):
                self.save_durable = True
        self.states.append((self.save, dict(self.durable), list(self.pending), set(self.synced), self.save_durable))

    def crash_states(self):
        seen = set()
        for save, durable, pending, synced, save_durable in self.states:
            for kept in range(len(pending) + 1):
                names = dict(durable)
                for op in pending[:kept]:
                    if op[0] is None:
                        names[op[1]] = op[2]
                    elif op[0] in names:
                        names[op[1]] = names.pop(op[0])
                state = {n: (self.data[i] if i in synced else b"") for n, i in names.items()}
                key = (save, save_durable and kept == len(pending), tuple(sorted((n, hash(c)) for n, c in state.items())))
                if key not in seen:
                    seen.add(key)
                    yield save, save_durable and kept == len(pending), state


def test_every_state_a_power_loss_leaves_behind_durable_saves_loads_the_newest_save_or_the_one_before(tmp_path):
    run = tmp_path / "run"
    _, database = build_run(str(run))
    save = saver(str(run), durable=False)
    for step in range(1, 5):
        save(step)
    save.writer.wait_durable()
    recorder = InodeRecorder(run)
    with storage.observe_write_steps(recorder):
        for step in (5, 6, 7):  # 6 writes three files (a better epoch)
            recorder.save, recorder.save_durable = step, False
            save(step)  # waits for the save before to be durable, then commits without waiting for the disk
            save.writer.wait_durable()  # what the next save waits for first (here: before the states are tagged)
        recorder.states.append((7, dict(recorder.live), [], set(recorder.synced), True))
    assert any(not durable for _, durable, _ in recorder.crash_states())
    loaded = set()
    for index, (step, durable, state) in enumerate(recorder.crash_states()):
        directory = tmp_path / f"crash{index}"
        found = load_crash_state(directory, state, database, f"crash state {index} during save {step}")
        expected = {step} if durable else {step - 1, step}
        assert found in expected, f"crash state {index} during save {step} loaded step {found}"
        loaded.add(found)
        shutil.rmtree(directory)
    assert loaded == {4, 5, 6, 7}


def test_a_save_made_durable_behind_is_waited_for_before_the_next_rotates_it(tmp_path):
    run = tmp_path / "run"
    build_run(str(run))
    save = saver(str(run), durable=False)
    order = []

    def note(step, path):
        if step in ("fsynced", "rotated", "directory_fsynced"):
            order.append((step, os.path.basename(path)))

    with storage.observe_write_steps(note):
        save(1)
        save(2)
        save.writer.wait_durable()
    # save 1's durability, behind, comes before save 2 rotates its file; save 2's own comes after its renames
    first_rotation = order.index(("rotated", "last_checkpoint.prev.pt"))
    assert ("fsynced", "last_checkpoint.pt") in order[:first_rotation]
    assert ("directory_fsynced", "last_checkpoint.pt") in order[:first_rotation]
    assert order[-1][0] == "directory_fsynced" and ("fsynced", "last_checkpoint.pt") in order[first_rotation:]
    assert (run / PREVIOUS_MANIFEST_NAME).exists()


def test_a_process_that_exits_right_after_a_save_waits_for_its_durability(tmp_path):
    """The fsyncs run on a thread behind the loop; a process that ends straight after a save (no wait of its own)
    still makes that save durable before it exits."""
    run = tmp_path / "run"
    build_run(str(run))
    marker = tmp_path / "fsynced.txt"
    script = f"""
import os, sys, time
sys.path.insert(0, {os.path.dirname(__file__)!r})
from experiment_io.storage import atomic as storage
from helpers import saver
real = os.fsync
def slow(fd):
    time.sleep(0.05)
    real(fd)
    with open({str(marker)!r}, "a") as f:
        f.write("x")
save = saver({str(run)!r}, durable=False)
save(3)
os.fsync = slow
save(4)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # save 4's file, its manifest and the directory: each fsync slowed, none cut off by the exit
    assert marker.exists() and len(marker.read_text()) >= 3
