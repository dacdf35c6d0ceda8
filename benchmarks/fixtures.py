"""What the benchmarks save and load: states of a given size, and run directories as train_model leaves them."""
import torch

import harness  # noqa: F401  (puts the library on sys.path when it is not installed)
from experiment_io import Evaluator, SetupParams, TrainingModules, setup_training
from experiment_io.format import codec as fmt
from experiment_io.experiment.controllers import TrainingPosition
from experiment_io.experiment.databases import Database
from experiment_io.storage.writer import RunWriter
from experiment_io.run.payloads import BEST_MODEL_NAME, LAST_NAME, STRUCTURE_NAME, checkpoint_payload, model_payload, save_payloads, structure_payload

from bench_models import BigModel  # importable, so that the trust gate admits it


def make_state(n_tensors, tensor_bytes):
    """``{"t0": ..., ...}``: float32 tensors of ``tensor_bytes`` each, every element written."""
    return {f"t{i}": torch.full((tensor_bytes // 4,), float(i + 1)) for i in range(n_tensors)}


def state_nbytes(state):
    return sum(t.nbytes for t in state.values())


def state_payload(state):
    """``state`` as the payload of a model file (a header and the state)."""
    return {fmt.HEADER_KEY: fmt.make_header("model", epochs_done=0, step=0), "model": state}


def tensors_of(obj):
    """Every tensor in ``obj`` (dicts, lists, tuples, modules), depth first."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.state_dict().values()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_of(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_of(v)


def touch(tensors):
    """Read every element (sum) of every tensor (meta tensors have none)."""
    total = 0.0
    for t in tensors:
        if t.device.type != "meta":
            total += float(t.sum())
    return total


def tiny_database():
    """A database of 4 samples (for the loaders, which want one)."""
    return Database({"x": torch.zeros(4, 1).numpy(), "y": torch.zeros(4, 1).numpy()}, ["x"], ["y"], 0, test_size=0.25, valid_size=0.25)


def build_run(directory, size):
    """A run directory as train_model leaves it for a model of ``size`` bytes.

    Files: the structure (the objects, without the weights), the last checkpoint
    (model, SGD controller, the best model state in the metric tracker) and
    best_model.pt.
    """
    model = BigModel(64, size // 64 // 4)
    evaluator = Evaluator(model, {"mse": torch.nn.MSELoss()})
    tm, controller, tracker = setup_training(TrainingModules(model, torch.nn.MSELoss(), evaluator),
                                             SetupParams(stopping_key="mse", batch_size=1, max_epochs=1,
                                                         optimizer=torch.optim.SGD))
    writer = RunWriter(directory)
    save_payloads(writer, {STRUCTURE_NAME: structure_payload(tm, controller, None)})
    digest = writer.record(STRUCTURE_NAME)["digest"]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    tracker.register_metrics({"train": {"loss": 1.0}, "valid": {"mse": 1.0}}, 0, epoch_time=1.0)
    tracker.record_best_model(model)
    controller.push_epoch(0, True, 1.0)
    database = tiny_database()
    controller.position = TrainingPosition(epoch=1, step=1)
    payload = checkpoint_payload(tm, controller, tracker, database, digest)
    save_payloads(writer, {LAST_NAME: payload, BEST_MODEL_NAME: model_payload(payload["model"], 1, 1, digest, "cpu")})
    return database
