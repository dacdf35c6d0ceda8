"""Structure files without weights (format 2): what is left out, what is kept, and loads that fill it in."""
import os

import pytest
import torch

from experiment_io.storage import verification
from experiment_io import Evaluator, SetupParams, TrainingModules, setup_training, train_model
from experiment_io.run import skeleton
from experiment_io.run.payloads import BEST_MODEL_NAME, STRUCTURE_NAME
from experiment_io.errors import IncompatibleCheckpointError
from experiment_io.loading.loaders import load_checkpoint_from_cwd, load_model_from_cwd

from helpers import make_database


class TiedNet(torch.nn.Module):
    """An encoder and decoder that share one weight, a non-persistent buffer and a tensor attribute."""

    def __init__(self, width=8):
        super().__init__()
        self.encode = torch.nn.Linear(3, width, bias=False)
        self.hidden = torch.nn.Linear(width, width)
        self.decode = torch.nn.Linear(width, 3, bias=False)
        self.decode.weight = self.encode.weight  # transposed use below
        self.out = torch.nn.Linear(3, 1)
        self.register_buffer("offset", torch.full((3,), 0.25), persistent=False)
        self.scale = torch.tensor(0.5)  # a plain attribute, in no state_dict
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        h = torch.tanh(self.encode(x + self.offset))
        h = torch.tanh(self.hidden(h))
        return self.out(self.scale * torch.nn.functional.linear(h, self.decode.weight.t()))


class CustomLoad(torch.nn.Linear):
    """A module that loads its state its own way: its tensors keep their data in the structure file."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ViewsItsWeight(torch.nn.Module):
    """Keeps a view of a parameter in a plain attribute: the view must follow the parameter after a resume."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)
        self.out = torch.nn.Linear(4, 1)
        self.first_row = self.linear.weight[0]  # a view, in no state_dict

    def forward(self, x):
        return self.out(torch.tanh(self.linear(x))) + (x * self.first_row.detach()).sum(dim=1, keepdim=True)


def train_tied(directory, max_epochs, seed=0, model_class=None):
    torch.manual_seed(seed)
    model = (model_class or TiedNet)()
    if isinstance(model, TiedNet):
        model.hidden.weight.tag = "hidden"  # an attribute on a parameter survives the round trip
    evaluator = Evaluator(model, {"mse": torch.nn.MSELoss()}, batch_size=64)
    tm, controller, tracker = setup_training(
        TrainingModules(model, torch.nn.MSELoss(), evaluator),
        SetupParams(stopping_key="mse", batch_size=32, max_epochs=max_epochs, learning_rate=0.02))
    database = make_database()
    train_model(tm, database, controller, tracker, None, None, quiet=True, directory=str(directory))
    return tm, controller, tracker, database


def raw_structure(directory):
    return torch.load(os.path.join(directory, STRUCTURE_NAME), weights_only=False, map_location="cpu")


def test_the_state_tensors_are_left_out_and_the_rest_is_kept(tmp_path):
    train_tied(tmp_path, 1)
    model = raw_structure(tmp_path)["training_modules"].model
    for name, tensor in model.state_dict(keep_vars=True).items():
        assert tensor.device.type == "meta", name
    assert model.decode.weight is model.encode.weight
    assert torch.equal(model.offset, torch.full((3,), 0.25))  # non-persistent: kept
    assert torch.equal(model.scale, torch.tensor(0.5))  # plain attribute: kept
    assert model.hidden.weight.tag == "hidden"


def test_a_large_model_gives_a_small_structure_file(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 1024), torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1))
    evaluator = Evaluator(model, {"mse": torch.nn.MSELoss()}, batch_size=64)
    tm, controller, tracker = setup_training(TrainingModules(model, torch.nn.MSELoss(), evaluator),
                                             SetupParams(stopping_key="mse", batch_size=64, max_epochs=1))
    train_model(tm, make_database(), controller, tracker, None, None, quiet=True, directory=str(tmp_path))
    assert os.path.getsize(tmp_path / BEST_MODEL_NAME) > 4_000_000
    assert os.path.getsize(tmp_path / STRUCTURE_NAME) < 20_000


def test_modules_with_their_own_loading_keep_their_data():
    plain, custom = torch.nn.Linear(2, 2), CustomLoad(2, 2)
    left_out = skeleton.restored_tensors(torch.nn.ModuleList([plain, custom]))
    assert set(left_out) == {id(plain.weight), id(plain.bias)}
    assert skeleton.restored_tensors(object()) == {}
    hooked = torch.nn.Sequential(torch.nn.Linear(2, 2))
    hooked._register_load_state_dict_pre_hook(lambda *args: None)  # may rename entries: keep every tensor
    assert skeleton.restored_tensors(hooked) == {}


def test_the_tied_model_predicts_with_one_shared_weight(tmp_path):
    tm, _, tracker, _ = train_tied(tmp_path, 2)
    for mmap in (True, False):
        model = load_model_from_cwd(directory=str(tmp_path), mmap=mmap)
        assert model.decode.weight is model.encode.weight
        assert len(list(model.parameters())) == 5
        assert model.hidden.weight.tag == "hidden"
        for name, value in tracker.best_model_state.items():
            assert torch.equal(model.state_dict()[name], value), name
        x = torch.randn(5, 3)
        expected = TiedNet()
        expected.load_state_dict(tracker.best_model_state)
        with torch.no_grad():
            assert torch.equal(model(x), expected.eval()(x))


def test_a_mapped_model_never_writes_its_file(tmp_path):
    train_tied(tmp_path, 2)
    before = verification.file_digest(tmp_path / BEST_MODEL_NAME).digest
    model = load_model_from_cwd(directory=str(tmp_path), mmap=True)
    with open("/proc/self/maps") as f:
        assert str(tmp_path / BEST_MODEL_NAME) in f.read()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    del model
    assert verification.file_digest(tmp_path / BEST_MODEL_NAME).digest == before
    assert load_model_from_cwd(directory=str(tmp_path), mmap=False).encode.weight.abs().max() < 10


def test_a_resumed_tied_model_trains_as_an_uninterrupted_one(tmp_path):
    whole = train_tied(tmp_path / "whole", 3)[0].model
    train_tied(tmp_path / "split", 2)
    check = load_checkpoint_from_cwd(directory=str(tmp_path / "split"), database=make_database())
    model = check["training_modules"].model
    assert model.decode.weight is model.encode.weight
    assert check["training_modules"].evaluator.model is model
    optimizer = check["controller"].optimizer
    assert [id(p) for g in optimizer.param_groups for p in g["params"]] == [id(p) for p in model.parameters()]
    assert all(p.device.type == "cpu" and p.requires_grad for p in model.parameters())
    check["controller"].max_epochs = 3
    train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, directory=str(tmp_path / "split"))
    for (name, a), b in zip(whole.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_state_that_does_not_fit_the_meta_model_is_refused():
    meta = torch.nn.Linear(3, 2, device="meta")
    with pytest.raises(IncompatibleCheckpointError, match="weight"):
        skeleton.materialize(meta, torch.nn.Linear(3, 4).state_dict(), "x.pt")
    with pytest.raises(IncompatibleCheckpointError, match="bias"):
        skeleton.materialize(meta, {"weight": torch.zeros(2, 3)}, "x.pt")
    state = skeleton.materialize(meta, {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, "x.pt")
    assert meta.weight.device.type == "cpu" and state["weight"] is meta.weight
    assert not any(t.is_meta for t in meta.state_dict().values())


def test_a_parameter_viewed_elsewhere_keeps_its_data_and_the_view_follows_it(tmp_path):
    whole = train_tied(tmp_path / "whole", 3, model_class=ViewsItsWeight)[0].model
    train_tied(tmp_path / "split", 2, model_class=ViewsItsWeight)
    stored = raw_structure(tmp_path / "split")["training_modules"].model
    assert stored.linear.weight.device.type == "cpu" and stored.out.weight.device.type == "meta"
    check = load_checkpoint_from_cwd(directory=str(tmp_path / "split"), database=make_database())
    model = check["training_modules"].model
    assert model.first_row.data_ptr() == model.linear.weight.data_ptr()
    check["controller"].max_epochs = 3
    train_model(**check, callbacks=None, batch_callbacks=None, quiet=True, directory=str(tmp_path / "split"))
    assert torch.equal(model.first_row, model.linear.weight[0])
    for (name, a), b in zip(whole.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
