"""Fixtures shared by the tests, and the CUDA skip."""
import contextlib

import pytest
import torch

from experiment_io import storage


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def write_steps():
    """``write_steps(observer)`` calls ``observer(step, path)`` at each step of every save until the test ends.

    The one hook of the write protocol (:func:`experiment_io.storage.observe_write_steps`):
    an observer that raises or sleeps at a step injects a fault or a delay there.
    """
    with contextlib.ExitStack() as stack:
        yield lambda observer: stack.enter_context(storage.observe_write_steps(observer))
