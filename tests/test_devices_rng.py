"""Devices and random streams: device requests, placement on load, RNG capture and restore."""
import io
import itertools
import random
import shutil
import warnings

import numpy as np
import pytest
import torch

from experiment_io.run import payloads as ckpt
from experiment_io.storage.writer import RunWriter
from experiment_io.run.payloads import save_payloads
from experiment_io.experiment.devices import check_location_args, module_device, resolve_device
from experiment_io.errors import DeviceError, ExperimentIOError
from experiment_io.experiment.rng import get_rng_state, placed_on_cpu, set_rng_state
from experiment_io.loading.loaders import load_checkpoint, load_checkpoint_from_cwd, load_model_from_cwd

from helpers import ScaledMSE, TinyNet, record_torch_loads, snapshot_directory, train_tiny_run

HAS_CUDA = torch.cuda.is_available()
cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


@pytest.fixture
def no_cuda(monkeypatch):
    """Make this process look like a machine without CUDA, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


# --- resolve_device ---------------------------------------------------------------


def test_auto_is_cpu_without_cuda(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_on_this_machine():
    expected = torch.device("cuda", torch.cuda.current_device()) if HAS_CUDA else torch.device("cpu")
    assert resolve_device("auto") == expected


@pytest.mark.parametrize("spec", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_cuda_without_cuda(no_cuda, spec):
    with pytest.raises(DeviceError) as info:
        resolve_device(spec)
    message = str(info.value)
    assert "model_device='cpu'" in message and "model_device='auto'" in message
    assert "cuda" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, ExperimentIOError)


def test_cuda_index_beyond_the_devices_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError) as info:
        resolve_device("cuda:1")
    assert "'cuda:1'" in str(info.value) and "only 1" in str(info.value)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


@pytest.mark.parametrize("spec, expected", [
    ("cpu", torch.device("cpu")),
    (torch.device("cpu"), torch.device("cpu")),
    ("meta", torch.device("meta")),
    (None, None),
])
def test_accepted_devices(spec, expected):
    assert resolve_device(spec) == expected


@pytest.mark.parametrize("spec", ["gpu0", "cuda:x", "", 3.5])
def test_malformed_device(spec):
    with pytest.raises(DeviceError) as info:
        resolve_device(spec)
    assert repr(spec) in str(info.value)


def test_check_location_args():
    check_location_args(None, None)
    check_location_args("cpu", None)
    check_location_args(None, "cpu")
    with pytest.raises(DeviceError) as info:
        check_location_args("cpu", "cpu")
    assert "map_location" in str(info.value) and "model_device" in str(info.value)
    assert "Drop" in str(info.value)


def test_module_device():
    assert module_device(TinyNet()) == torch.device("cpu")
    assert module_device(TinyNet().to("meta")) == torch.device("meta")
    assert module_device(ScaledMSE().to("meta")) == torch.device("meta")  # buffers only
    assert module_device(torch.nn.MSELoss(), default="meta") == torch.device("meta")  # nothing at all
    assert module_device(lambda x: x) == torch.device("cpu")


# --- RNG --------------------------------------------------------------------------


def draw():
    """A few numbers from every stream, including the cached Gaussians of numpy and random."""
    return (
        torch.rand(5).tolist(), torch.randn(3).tolist(), torch.randint(0, 1000, (4,)).tolist(),
        np.random.rand(5).tolist(), np.random.randn(3).tolist(), np.random.randint(0, 1000, 4).tolist(),
        [random.random() for _ in range(5)], [random.gauss(0, 1) for _ in range(3)],
    )


def scramble():
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)


def half_used_gaussians():
    """Leave numpy's and random's cached second Gaussian set, so the state must carry it."""
    np.random.randn(1)
    random.gauss(0, 1)


def test_rng_round_trip():
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    half_used_gaussians()
    state = get_rng_state()
    expected = draw()
    scramble()
    assert draw() != expected
    set_rng_state(state)
    assert draw() == expected


def test_rng_state_is_not_changed_by_capturing():
    torch.manual_seed(2)
    state = get_rng_state()
    first = draw()
    set_rng_state(state)
    get_rng_state()
    get_rng_state()
    assert draw() == first


def saved_and_loaded(state, map_location):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True, map_location=map_location)


@pytest.mark.parametrize("map_location", ["cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, loc: storage,
                                          pytest.param("cuda", marks=cuda)],
                         ids=["str", "device", "dict", "callable", "cuda"])
def test_rng_state_survives_save_and_weights_only_load(map_location):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    half_used_gaussians()
    state = get_rng_state()
    expected = draw()
    loaded = saved_and_loaded(state, map_location)
    placed = placed_on_cpu(loaded)
    assert placed["torch"].device.type == "cpu" and placed["torch"].dtype == torch.uint8
    assert torch.equal(placed["torch"], state["torch"])
    for s in placed["cuda"]:
        assert s.device.type == "cpu" and s.dtype == torch.uint8
    assert placed["numpy"]["key"].device.type == "cpu"
    scramble()
    set_rng_state(placed)
    assert draw() == expected


def test_rng_state_is_plain_data():
    state = get_rng_state()
    assert set(state) == {"torch", "cuda", "numpy", "python"}
    assert state["torch"].dtype == torch.uint8 and state["torch"].device.type == "cpu"
    internal = state["python"]["internal"]  # one tensor, not 625 objects to pickle at every save
    assert internal.dtype == torch.int64 and internal.shape == (625,)


def test_python_random_state_of_older_checkpoints_a_list_still_restores():
    import random
    state = get_rng_state()
    expected = [random.random() for _ in range(3)]
    old = {**state, "python": {**state["python"], "internal": state["python"]["internal"].tolist()}}
    set_rng_state(old)
    assert [random.random() for _ in range(3)] == expected
    assert state["numpy"]["key"].dtype == torch.int64
    assert len(state["cuda"]) == (torch.cuda.device_count() if HAS_CUDA else 0)


def test_placed_on_cpu_converts_dtype_and_leaves_input_alone():
    state = get_rng_state()
    odd = dict(state)
    odd["torch"] = state["torch"].to(torch.int32)
    odd["cuda"] = [state["torch"].to(torch.int64)]
    placed = placed_on_cpu(odd)
    assert placed["torch"].dtype == torch.uint8 and torch.equal(placed["torch"], state["torch"])
    assert placed["cuda"][0].dtype == torch.uint8
    assert odd["torch"].dtype == torch.int32  # the input is not modified


def test_set_rng_state_with_more_cuda_states_than_devices(no_cuda, caplog):
    state = get_rng_state()
    state["cuda"] = [state["torch"].clone(), state["torch"].clone()]
    expected = draw()
    scramble()
    with caplog.at_level("WARNING", logger="experiment_io.experiment.rng"):
        set_rng_state(state)
    assert draw() == expected
    assert "2 CUDA device(s)" in caplog.text


# --- placement on load ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run trained on the CPU, with buffered training and evaluation losses."""
    directory = tmp_path_factory.mktemp("run")
    tm, controller, tracker, database = train_tiny_run(directory, buffered=True, max_epochs=2)
    # the streams as they were saved in the last checkpoint (nothing drew since)
    state = get_rng_state()
    expected = draw()
    set_rng_state(state)
    return {"directory": directory, "training_modules": tm, "controller": controller, "database": database,
            "expected_draw": expected}


@pytest.fixture
def run_copy(trained_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(trained_run["directory"], target)
    return target


def tensors_of(module):
    return list(itertools.chain(module.parameters(), module.buffers()))


def expected_state_device(param, key, group):
    """Where torch keeps an optimizer state entry: with its parameter, except the CPU
    ``step`` counter of optimizers that are neither fused nor capturable."""
    if key == "step" and not (group.get("fused") or group.get("capturable")):
        return torch.device("cpu")
    return param.device


DEVICES = ["cpu", "meta", pytest.param("cuda", marks=cuda)]


@pytest.mark.parametrize("device", DEVICES)
def test_every_object_lands_on_its_device(run_copy, trained_run, device):
    scramble()
    with warnings.catch_warnings():
        # loading a state into meta tensors is a no-op that torch warns about
        warnings.simplefilter("ignore" if device == "meta" else "error")
        loaded = load_checkpoint_from_cwd(model_device=device, directory=run_copy, database=trained_run["database"])
    target = resolve_device(device)
    model, loss, evaluator = loaded["training_modules"]
    assert all(t.device == target for t in tensors_of(model))
    assert tensors_of(loss) and all(t.device == target for t in tensors_of(loss))
    eval_tensors = [t for fn in evaluator.evaluation_losses.values() if isinstance(fn, torch.nn.Module) for t in tensors_of(fn)]
    assert eval_tensors and all(t.device.type == "cpu" for t in eval_tensors)
    optimizer = loaded["controller"].optimizer
    assert optimizer.state, "the optimizer state was restored"
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state[p].items():
                if isinstance(value, torch.Tensor):
                    assert value.device == expected_state_device(p, key, group), (key, value.device, p.device)
    # the random streams are restored, and on the CPU
    assert draw() == trained_run["expected_draw"]
    for name, value in loaded["metric_tracker"].best_model_state.items():
        assert value.device.type == "cpu", name

    if device != "meta":  # meta tensors hold no values, and Module.to("meta") makes new Parameter objects
        assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
        original = trained_run["training_modules"].model.state_dict()
        for key, value in model.state_dict().items():
            assert torch.equal(value.cpu(), original[key]), key
        original_opt = trained_run["controller"].optimizer.state_dict()["state"]
        for index, entries in optimizer.state_dict()["state"].items():
            for key, value in entries.items():
                assert torch.equal(value.cpu(), original_opt[index][key].cpu()), (index, key)


@pytest.mark.parametrize("device", DEVICES)
def test_model_for_prediction_lands_on_model_device(run_copy, trained_run, device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if device == "meta" else "error")
        model = load_model_from_cwd(model_device=device, directory=run_copy)
    assert isinstance(model, TinyNet) and not model.training
    assert all(t.device == resolve_device(device) for t in tensors_of(model))
    if device != "meta":
        tracker_best = load_checkpoint_from_cwd(directory=run_copy, database=trained_run["database"],
                                                restore_rng=False)["metric_tracker"].best_model_state
        for key, value in model.state_dict().items():
            assert torch.equal(value.cpu(), tracker_best[key]), key


@pytest.mark.parametrize("map_location", ["cpu", pytest.param("cuda", marks=cuda)])
def test_map_location_places_every_tensor_but_rng(run_copy, trained_run, map_location):
    """map_location sends every tensor where it says; RNG states always go to the CPU (documented)."""
    scramble()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_checkpoint_from_cwd(map_location=map_location, directory=run_copy, database=trained_run["database"])
    model, loss, _ = loaded["training_modules"]
    assert all(t.device.type == map_location for t in tensors_of(model) + tensors_of(loss))
    assert draw() == trained_run["expected_draw"]


def rewrite_header(directory, name, **fields):
    """Rewrite a state file of a run with changed header fields, keeping its manifest consistent."""
    path = directory / name
    payload = torch.load(path, weights_only=True)
    writer = RunWriter(directory)
    if "experiment_io" not in payload:  # a model file: its plain state_dict, its header in the manifest record
        header = {k: v for k, v in writer.record(name).items() if k not in ("digest", "size", "written_at")}
        payload = {"experiment_io": header, "model": payload}
    payload["experiment_io"].update(fields)
    save_payloads(writer, {name: payload})


def test_saved_on_a_missing_gpu_needs_model_device(run_copy, trained_run, no_cuda):
    """A checkpoint saved on cuda:0 (as its header says) on a machine without CUDA."""
    rewrite_header(run_copy, ckpt.LAST_NAME, model_device="cuda:0")
    rewrite_header(run_copy, ckpt.BEST_MODEL_NAME, model_device="cuda:0")
    for load in (lambda **kw: load_checkpoint_from_cwd(directory=run_copy, database=trained_run["database"], **kw),
                 lambda **kw: load_model_from_cwd(directory=run_copy, **kw)):
        with pytest.raises(DeviceError) as info:
            load()
        message = str(info.value)
        assert "cuda:0" in message and "model_device='cpu'" in message
        assert ckpt.LAST_NAME in message or ckpt.BEST_MODEL_NAME in message
        for device in ("cpu", "auto"):
            result = load(model_device=device)
            model = result if isinstance(result, torch.nn.Module) else result["training_modules"].model
            assert all(t.device.type == "cpu" for t in tensors_of(model))


def test_default_returns_model_to_its_saved_device(run_copy, trained_run):
    loaded = load_checkpoint_from_cwd(directory=run_copy, database=trained_run["database"])
    assert all(t.device.type == "cpu" for t in tensors_of(loaded["training_modules"].model))


@pytest.mark.parametrize("loader", ["load_checkpoint", "load_checkpoint_from_cwd", "load_model_from_cwd"])
def test_map_location_and_model_device_refused_before_any_file_is_touched(tmp_path, loader, monkeypatch):
    missing = tmp_path / "no_such_run"
    touched = record_torch_loads(monkeypatch)
    with pytest.raises(DeviceError) as info:
        if loader == "load_checkpoint":
            load_checkpoint(missing / ckpt.STRUCTURE_NAME, missing / ckpt.LAST_NAME, map_location="cpu", model_device="cpu")
        elif loader == "load_checkpoint_from_cwd":
            load_checkpoint_from_cwd(map_location="cpu", model_device="cpu", directory=missing)
        else:
            load_model_from_cwd(map_location="cpu", model_device="cpu", directory=missing)
    assert "map_location" in str(info.value) and "model_device" in str(info.value)
    assert touched == []


@pytest.mark.parametrize("loader", ["load_checkpoint_from_cwd", "load_model_from_cwd"])
def test_map_location_and_model_device_on_a_real_run(run_copy, trained_run, loader):
    before = snapshot_directory(run_copy)
    with pytest.raises(DeviceError):
        if loader == "load_checkpoint_from_cwd":
            load_checkpoint_from_cwd(map_location="cpu", model_device="cpu", directory=run_copy,
                                     database=trained_run["database"])
        else:
            load_model_from_cwd(map_location="cpu", model_device="cpu", directory=run_copy)
    assert snapshot_directory(run_copy) == before


# --- CUDA -------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_saved_on_cuda_loads_on_cpu(tmp_path):
    tm, controller, tracker, database = train_tiny_run(tmp_path, device="cuda", buffered=True)
    assert all(t.is_cuda for t in tensors_of(tm.model))
    saved_cuda_rng = torch.cuda.get_rng_state()

    torch.cuda.manual_seed_all(12345)
    loaded = load_checkpoint_from_cwd(model_device="cpu", directory=tmp_path, database=database)
    model, loss, evaluator = loaded["training_modules"]
    assert all(t.device.type == "cpu" for t in tensors_of(model) + tensors_of(loss))
    optimizer = loaded["controller"].optimizer
    assert optimizer.state
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert p.device.type == "cpu"
            for key, value in optimizer.state[p].items():
                if isinstance(value, torch.Tensor):
                    assert value.device.type == "cpu", key
    for value in loaded["metric_tracker"].best_model_state.values():
        assert value.device.type == "cpu"
    assert torch.equal(torch.cuda.get_rng_state(), saved_cuda_rng)  # the CUDA stream was restored

    payload = torch.load(tmp_path / ckpt.LAST_NAME, map_location="cuda", weights_only=True)
    placed = placed_on_cpu(payload["rng"])
    for state in [placed["torch"], *placed["cuda"]]:
        assert state.device.type == "cpu" and state.dtype == torch.uint8
    assert len(placed["cuda"]) == torch.cuda.device_count()

    on_gpu = load_model_from_cwd(model_device="cuda", directory=tmp_path)
    assert all(t.is_cuda for t in tensors_of(on_gpu))
    on_cpu = load_model_from_cwd(model_device="cpu", directory=tmp_path)
    assert all(t.device.type == "cpu" for t in tensors_of(on_cpu))
    for (name, a), (_, b) in zip(on_gpu.state_dict().items(), on_cpu.state_dict().items()):
        assert torch.equal(a.cpu(), b), name
