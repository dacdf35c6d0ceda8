"""Fuzzing every loader with random and mutated bytes.

Each call must return a verified object or raise an error of the library's own
hierarchy: no other exception type, no hang. The manifest is rewritten to vouch for
the fuzzed bytes, so that the unpickling paths (not only the digest check) are fuzzed.
"""
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experiment_io.storage import verification
import experiment_io.run.trust as trust
from experiment_io.run.payloads import BEST_MODEL_NAME, LAST_NAME, STRUCTURE_NAME
from experiment_io.errors import ExperimentIOError
from experiment_io.loading.loaders import load_checkpoint, load_checkpoint_from_cwd, load_model_from_cwd
from experiment_io.storage.manifest import MANIFEST_NAME

from helpers import rewrite_manifest, make_database, train_tiny_run

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    directory = tmp_path_factory.mktemp("template")
    train_tiny_run(directory, max_epochs=1)
    return directory


def fresh_copy(template, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    for name in os.listdir(template):
        if os.path.isfile(template / name):
            shutil.copy(template / name, directory / name)
    return directory


def vouch(directory, name):
    """Rewrite the manifest so that it describes the (fuzzed) file ``name``."""
    rewrite_manifest(directory, lambda files: files[name].update(
        verification.file_digest(os.path.join(directory, name)).as_dict()))


def mutate(data, edits, cut):
    data = bytearray(data)
    for position, value in edits:
        if data:
            data[position % len(data)] = value
    return bytes(data[: len(data) - (cut % (len(data) + 1))]) if cut else bytes(data)


def call_every_loader(directory):
    outcomes = []
    loaders = [
        lambda: load_checkpoint_from_cwd(directory=str(directory), database=make_database(), restore_rng=False),
        lambda: load_model_from_cwd(directory=str(directory)),
        lambda: load_checkpoint(os.path.join(directory, STRUCTURE_NAME), os.path.join(directory, LAST_NAME),
                                database=make_database(), verify=False, restore_rng=False),
        lambda: trust.load_structure(os.path.join(directory, STRUCTURE_NAME)),
    ]
    for load in loaders:
        try:
            outcomes.append(load())
        except ExperimentIOError as e:
            outcomes.append(e)
    return outcomes


@FUZZ
@given(name=st.sampled_from([STRUCTURE_NAME, LAST_NAME, BEST_MODEL_NAME]), data=st.binary(max_size=4096))
def test_random_bytes(template, tmp_path_factory, name, data):
    directory = fresh_copy(template, tmp_path_factory)
    with open(directory / name, "wb") as f:
        f.write(data)
    vouch(directory, name)
    call_every_loader(directory)


@FUZZ
@given(name=st.sampled_from([STRUCTURE_NAME, LAST_NAME, BEST_MODEL_NAME]),
       edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=8),
       cut=st.integers(min_value=0, max_value=5000))
def test_mutated_files(template, tmp_path_factory, name, edits, cut):
    directory = fresh_copy(template, tmp_path_factory)
    original = (directory / name).read_bytes()
    mutated = mutate(original, edits, cut)
    (directory / name).write_bytes(mutated)
    vouch(directory, name)
    outcomes = call_every_loader(directory)
    if mutated == original:  # an unchanged file must load through every loader
        assert not any(isinstance(o, Exception) for o in outcomes), outcomes


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_manifest(template, tmp_path_factory, data):
    directory = fresh_copy(template, tmp_path_factory)
    (directory / MANIFEST_NAME).write_bytes(data)
    for outcome in call_every_loader(directory)[:2]:
        assert isinstance(outcome, ExperimentIOError)
