"""experiment_io.lineage on a directory it did not write alone: links, forged records, killed removals; and a
changed set-up that makes a whole chain of checkpoints stale."""
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from experiment_io.errors import CheckpointWriteError, IncompatibleCheckpointError
from experiment_io.frontends.cli import main as cli_main
from experiment_io.frontends.lineage import Model
from experiment_io.frontends.lineage.listing import descendants, tree
from experiment_io.frontends.lineage.records import BLOCK_NAME, Records, record_write

from test_lineage import loaders, new_model


def forge(model_directory, cp_id, record):
    """A block record written by the library's own writer (it verifies), holding whatever ``record`` is."""
    write, fields = record_write(record if isinstance(record, dict) else {}, "block")
    if not isinstance(record, dict):
        write = lambda f: torch.save(record, f)  # noqa: E731
    Records(str(model_directory)).save(cp_id, {BLOCK_NAME: (write, fields)})


def good(cp_id, parent, created):
    return {"id": cp_id, "parent": parent, "results": [], "complete": True, "created": created, "recipe": {}}


def test_a_planted_link_as_a_checkpoint_folder_is_never_written_or_read_through(tmp_path, caplog):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    os.makedirs(root / "net")
    os.symlink(outside, root / "net" / "1")
    model = new_model(root)
    train_dl, test_dl = loaders()
    with pytest.raises(CheckpointWriteError) as info:
        with model.checkpoint(1) as cp:
            cp.train(train_dl, test_dl, epochs=1)
    assert "is a link" in str(info.value) and str(root / "net" / "1") in str(info.value)
    assert os.listdir(outside) == []  # no block, manifest or lock written there
    forge(outside.parent / "other", "x", good("x", None, 1.0))  # a real checkpoint folder, elsewhere
    os.rmdir(outside)
    os.symlink(outside.parent / "other" / "x", root / "net" / "2")
    with caplog.at_level(logging.WARNING, logger="experiment_io"):
        text = tree(root / "net")
    assert "(no checkpoints)" in text and any("is a link" in r.getMessage() for r in caplog.records)
    model.delete_checkpoint(2)  # the link goes, not what it points to
    assert not os.path.lexists(root / "net" / "2") and (outside.parent / "other" / "x" / BLOCK_NAME).exists()


@pytest.mark.parametrize("forged", [
    "text", None, 7, [1, 2], {"results": "many"}, {"results": [1]}, {"results": [{"result": {"history": 3}}]},
    {"id": "1", "parent": 5, "results": [{"result": {"history": {"epoch": [0, 1]}, "best_value": "high",
                                                     "best_epoch": [], "watch": 4}}], "complete": "yes",
     "created": "today", "description": 12},
])
def test_forged_block_records_are_left_out_or_shown_never_raised(tmp_path, forged, capsys):
    model_dir = tmp_path / "net"
    forge(model_dir, "1", forged)
    forge(model_dir, "2", good("2", "1", 2.0))
    text = tree(model_dir)
    assert text.splitlines()[0] == "net" and "2 (no training)" in text
    assert cli_main(["lineage", str(model_dir)]) == 0
    assert "2 (no training)" in capsys.readouterr().out


def test_a_chain_of_parents_deeper_than_the_recursion_limit_and_a_loop_are_shown(tmp_path):
    model_dir = tmp_path / "net"
    depth = sys.getrecursionlimit() + 100
    Records(str(model_dir))  # made once: every forged checkpoint below goes through one writer each
    for i in range(depth):
        forge(model_dir, f"c{i}", good(f"c{i}", f"c{i - 1}" if i else None, float(i)))
    forge(model_dir, "a", good("a", "b", 1e9))
    forge(model_dir, "b", good("b", "a", 1e9 + 1))
    text = tree(model_dir)
    lines = text.splitlines()
    assert len(lines) == 1 + depth + 2
    assert lines[1].startswith("└── c0") and lines[depth].lstrip(" └─").startswith(f"c{depth - 1} ")
    assert "its parents loop back to" in text and descendants(model_dir, "c0")[:2] == ["c1", "c2"]
    assert len(descendants(model_dir, "c0")) == depth - 1 and set(descendants(model_dir, "a")) == {"b"}


def test_folders_of_killed_removals_are_removed_and_others_kept(tmp_path):
    model_dir = tmp_path / "net"
    forge(model_dir, "1", good("1", None, 1.0))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    leftovers = [f".deleting-1-{pid}", f".deleting-2-{pid}@{os.uname().nodename}"]
    kept = [f".deleting-3-{pid}@another-host", ".deleting-of-the-user", f".deleting-4-{os.getpid() + 0}x"]
    leftovers.append(f".deleting-5-{10**30}")  # a pid no kernel gives: no such process, and no crash
    for name in leftovers + kept:
        shutil.copytree(model_dir / "1", model_dir / name)
    tree(model_dir)  # a listing only reads
    assert set(leftovers) <= set(os.listdir(model_dir))
    Model("net", torch.nn.Linear(2, 2), root=tmp_path, quiet=True)  # a model used to train sweeps
    names = set(os.listdir(model_dir))
    assert not names & set(leftovers) and set(kept) <= names and "1" in names


def test_a_changed_set_up_names_every_stale_checkpoint_and_one_call_deletes_them(tmp_path):
    train_dl, test_dl = loaders()
    model = new_model(tmp_path)

    def chain(lr):
        with model.checkpoint(1) as cp:
            cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.SGD, optimizer_args=dict(lr=lr))
            cp.train(train_dl, test_dl, epochs=1)
        for cp_id in (2, 3):
            with model.checkpoint(cp_id) as cp:
                cp.train(train_dl, test_dl, epochs=1)

    chain(0.1)
    model = new_model(tmp_path)
    with pytest.raises(IncompatibleCheckpointError) as info:
        chain(0.05)
    message = str(info.value)
    assert "model.delete_checkpoint('1', descendants=True)" in message and "2, 3" in message
    model = new_model(tmp_path)
    model.delete_checkpoint("1", descendants=True)  # as the message says
    assert model.checkpoints() == []
    chain(0.05)
    assert model.checkpoints() == ["1", "2", "3"]


def test_descendants_are_found_through_a_checkpoint_whose_record_is_lost(tmp_path):
    model_dir = tmp_path / "net"
    forge(model_dir, "2", good("2", "1", 2.0))  # checkpoint 1's own record is gone
    forge(model_dir, "3", good("3", "2", 3.0))
    assert descendants(model_dir, "1") == ["2", "3"]


def test_the_lineage_command_escapes_what_the_records_say(tmp_path, capsys):
    model_dir = tmp_path / "net"
    record = good("1", None, 1.0)
    record["description"] = "fine\n└── 9 (forged line)\x1b[2J"
    forge(model_dir, "1", record)
    assert cli_main(["lineage", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and not any(line.startswith("└── 9") for line in out.splitlines())
