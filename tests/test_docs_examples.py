"""The scripts that README.rst and docs/ show run as written.

A python code block whose first line is ``# <name>.py`` is a file of the example:
blocks that another block imports are modules, the others are scripts, run in the
order the document shows them, each in a fresh process, in one directory that
holds the modules and the data file the text describes (``data.h5`` with ``x`` and
``y``). A script that starts or resumes (``missing_ok=True``) also runs twice in
an empty directory: the first start, then the restart.
"""
import os
import re
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.rst"] + sorted(os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs"))
                                    if n.endswith(".rst"))


def named_blocks(document):
    """``[(file name, code)]`` of the document's python blocks that start with ``# <name>.py``."""
    text = open(os.path.join(ROOT, document), encoding="utf-8").read()
    blocks = []
    for match in re.finditer(r"\.\. code-block:: python\n\n((?:(?: {4}.*)?\n)+)", text):
        code = textwrap.dedent(match.group(1))
        first = code.lstrip("\n").splitlines()[0]
        name = re.fullmatch(r"# (\w+\.py)", first.strip())
        if name:
            blocks.append((name.group(1), code))
    return blocks


def write_data(path, n=240):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype("float32")
    with h5py.File(path, "w") as h5:
        h5["x"] = x
        h5["y"] = np.tanh(x @ np.array([[0.5], [-1.0], [0.25]], dtype="float32"))


def run(script, directory):
    result = subprocess.run([sys.executable, script], cwd=directory, capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result


def prepare(directory, blocks):
    directory.mkdir()
    for name, code in blocks:
        (directory / name).write_text(code)
    write_data(directory / "data.h5")


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if named_blocks(d)])
def test_the_documented_scripts_run_as_written(document, tmp_path):
    blocks = named_blocks(document)
    modules = {name for name, _ in blocks
               if any(re.search(rf"^\s*(import|from) {name[:-3]}\b", code, re.M) for _, code in blocks)}
    scripts = [name for name, _ in blocks if name not in modules]
    assert scripts, f"{document} names files but no script"
    prepare(tmp_path / "as_shown", blocks)
    for script in scripts:
        run(script, tmp_path / "as_shown")
    for script in [name for name, code in blocks if name in scripts and "missing_ok=True" in code]:
        fresh = tmp_path / f"fresh_{script[:-3]}"
        prepare(fresh, blocks)
        first = run(script, fresh)
        assert "epoch 0" in first.stderr  # trained from the start
        run(script, fresh)  # and resumed


def test_the_readme_shows_the_start_and_restart_scripts():
    names = [name for name, _ in named_blocks("README.rst")]
    for expected in ("mynets.py", "train.py", "restart.py", "predict.py", "run.py"):
        assert expected in names


def _history(directory):
    """metrics.csv without its timings."""
    lines = (directory / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, column in enumerate(header) if column != "time_s"]
    return [[line.split(",")[i] for i in keep] for line in lines]


def test_the_readme_s_seeded_scripts_show_that_an_interrupted_run_ends_as_an_uninterrupted_one(tmp_path):
    """As the README says: Ctrl-C in train.py, run.py to finish; train.py uninterrupted elsewhere; same history."""
    import signal
    import torch

    blocks = named_blocks("README.rst")
    for name in ("interrupted", "uninterrupted"):
        prepare(tmp_path / name, blocks)
        write_data(tmp_path / name / "data.h5", n=40000)  # epochs long enough to be interrupted in
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([sys.executable, "train.py"], cwd=tmp_path / "interrupted", stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stderr:
        if re.search(r"\bepoch 1\b", line):
            proc.send_signal(signal.SIGINT)
            break
    proc.communicate(timeout=300)
    assert proc.returncode == 0
    from experiment_io.storage.manifest import read_manifest
    record = read_manifest(str(tmp_path / "interrupted"))[1]["last_checkpoint.pt"]
    assert not record["finished"], "train.py ended before Ctrl-C reached it"
    run("run.py", tmp_path / "interrupted")
    run("train.py", tmp_path / "uninterrupted")
    assert _history(tmp_path / "interrupted") == _history(tmp_path / "uninterrupted")
    best = [torch.load(tmp_path / name / "best_model.pt", weights_only=True) for name in ("interrupted", "uninterrupted")]
    assert best[0].keys() == best[1].keys() and all(torch.equal(best[0][k], best[1][k]) for k in best[0])
