"""4. A small scientific model checkpointed every epoch (last + best + best model).

Cost per epoch of experiment_io's save vs the same dicts saved with torch.save,
and as a fraction of the epoch; then train_model itself with synchronous and
asynchronous saves.
"""
import logging
import os
import shutil
import statistics
import time

import torch

import harness
from experiment_io import Evaluator, SetupParams, TrainingModules, load_model_from_cwd, setup_training, train_model
from experiment_io.training.asynchronous import BackgroundWriter
from experiment_io.experiment.controllers import TrainingPosition
from experiment_io.experiment.databases import Database
from experiment_io.storage.writer import RunWriter
from experiment_io.run.payloads import BEST_MODEL_NAME, BEST_NAME, LAST_NAME, STRUCTURE_NAME, checkpoint_payload, model_payload, save_payloads, structure_payload
from bench_models import SmallNet  # importable, so that the trust gate admits it
from fixtures import tensors_of

NAME = "small"
BASELINE = "torch.save of the same dicts (no fsync)"


def small_experiment(seed=0, n=8192):
    """A regression of 16 inputs (``n`` samples) with :class:`SmallNet` and Adam."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=generator)
    y = torch.sin(x).sum(dim=1, keepdim=True)
    database = Database({"x": x.numpy(), "y": y.numpy()}, ["x"], ["y"], seed, test_size=0.1, valid_size=0.1)
    model = SmallNet()
    evaluator = Evaluator(model, {"mse": torch.nn.MSELoss(), "mae": torch.nn.L1Loss()}, batch_size=1024)
    tm, controller, tracker = setup_training(TrainingModules(model, torch.nn.MSELoss(), evaluator),
                                             SetupParams(stopping_key="mse", batch_size=64, max_epochs=10**6,
                                                         optimizer=torch.optim.Adam))
    return database, tm, controller, tracker


def _checkpoint_files(directory, database, tm, controller, tracker):
    """The files of one epoch's checkpoint (last + best + best model), and the writer of a run for them."""
    writer = RunWriter(os.path.join(directory, "small-run"))
    save_payloads(writer, {STRUCTURE_NAME: structure_payload(tm, controller, None)})
    digest = writer.record(STRUCTURE_NAME)["digest"]
    position = TrainingPosition(epoch=controller.current_epoch, step=100)
    controller.position = position
    payload = checkpoint_payload(tm, controller, tracker, database, digest)
    files = {LAST_NAME: payload, BEST_NAME: payload,
             BEST_MODEL_NAME: model_payload(payload["model"], position.epoch, position.step, digest, "cpu")}
    return writer, files


def checkpoint_cost(directory, reps, seed):
    """One epoch's checkpoint, saved in the ways compared; ``(results, n_params, n_tensors, database)``."""
    database, tm, controller, tracker = small_experiment()
    n_params = sum(p.numel() for p in tm.model.parameters())
    # train a few epochs so that Adam's state and a best model exist, as in a real run
    controller.max_epochs = 2
    train_model(tm, database, controller, tracker, None, None, quiet=True, directory=os.path.join(directory, "small-warm"))
    writer, files = _checkpoint_files(directory, database, tm, controller, tracker)
    n_tensors = sum(1 for _ in tensors_of(files[LAST_NAME]))
    plain_dir = os.path.join(directory, "small-plain")
    os.makedirs(plain_dir, exist_ok=True)

    def plain(fsync):
        for name, p in files.items():
            with open(os.path.join(plain_dir, name), "wb") as f:
                torch.save(p, f)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())

    background, async_writer = BackgroundWriter(), RunWriter(os.path.join(directory, "small-async"))
    blocked = []

    def async_blocked():
        background.wait()
        started = time.perf_counter()
        background.submit(files, lambda staged: save_payloads(async_writer, staged), "small model checkpoint")
        blocked.append(time.perf_counter() - started)

    methods = {
        "experiment_io sync save: last, best, best_model + manifest": lambda: save_payloads(writer, files),
        BASELINE: lambda: plain(False),
        "torch.save of the same dicts + fsync each": lambda: plain(True),
        "async_save: blocked (staging) + wait for the previous one": async_blocked,
    }
    results = harness.summaries(harness.side_by_side(methods, reps, seed=seed))
    background.wait()
    results["async_save: loop blocked (staging only)"] = harness.summary(blocked[-reps:])
    return results, n_params, n_tensors, database


def hand_written_loop(database, tm, controller, tracker, epochs, where, first=0):
    """The same training written by hand, with hippynn's saves: at a better epoch, ``torch.save`` of the model's
    state_dict and of a checkpoint dict (no fsync, no manifest, nothing at other epochs). Epochs ``first`` to
    ``first + epochs - 1``."""
    os.makedirs(where, exist_ok=True)
    model, loss_fn, evaluator = tm
    optimizer = controller.optimizer
    for epoch in range(first, first + epochs):
        model.train()
        for inputs, targets in database.batches("train", controller.batch_size, order=database.epoch_order(epoch)):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(*inputs), *targets)
            loss.backward()
            optimizer.step()
        metrics = {"valid": evaluator.evaluate("valid", database=database, batch_size=controller.eval_batch_size)}
        if tracker.register_metrics(metrics, epoch):
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            torch.save(best, os.path.join(where, "best_model.pt"))
            torch.save({"model": best, "controller": controller.state_dict(), "metric_tracker": tracker.state_dict(),
                        "torch_rng_state": torch.get_rng_state()}, os.path.join(where, "best_checkpoint.pt"))


def train_model_runs(directory, epochs, reps, seed):
    """train_model over ``epochs`` epochs, with synchronous and with asynchronous saves, and the hand-written loop
    with hippynn-style saves."""
    walls, epoch_times = {"sync": [], "async": [], "hand": []}, {"sync": [], "async": [], "hand": []}

    def hand_run():
        database, tm, controller, tracker = small_experiment()
        where = os.path.join(directory, "small-train-hand")
        shutil.rmtree(where, ignore_errors=True)
        started = time.perf_counter()
        hand_written_loop(database, tm, controller, tracker, epochs, where)
        walls["hand"].append((time.perf_counter() - started) / epochs)
        epoch_times["hand"].append(statistics.median(tracker.epoch_times) if tracker.epoch_times else float("nan"))

    def train_run(mode):
        def run():
            database, tm, controller, tracker = small_experiment()
            controller.max_epochs = epochs
            where = os.path.join(directory, f"small-train-{mode}")
            shutil.rmtree(where, ignore_errors=True)
            started = time.perf_counter()
            # without what train_model does once at the end (the best model's evaluation, the plots): not a
            # per-epoch cost, and the hand loop has neither
            train_model(tm, database, controller, tracker, None, None, quiet=True, async_save=mode == "async",
                        directory=where, evaluate_best=False, plots=False)
            walls[mode].append((time.perf_counter() - started) / epochs)
            epoch_times[mode].append(statistics.median(tracker.epoch_times))
        return run

    harness.side_by_side({"sync": train_run("sync"), "async": train_run("async"), "hand": hand_run}, reps, seed=seed,
                         warmup=False)
    return {mode: {"wall_per_epoch_s": statistics.median(walls[mode]),
                   "epoch_time_s": statistics.median(epoch_times[mode])} for mode in walls}


SMALL_OURS = "load_model_from_cwd() (verified, trust gate)"
SMALL_TRUSTED = "load_model_from_cwd(trusted=True) (verified, no gate)"
SMALL_IN_CODE = "SmallNet() + torch.load(best_model) + load_state_dict"
SMALL_HIPPYNN = "torch.load(structure, unrestricted) + best_model + load"


def small_loads(directory, reps, seed, calls=20):
    """The small model loaded for prediction, ``calls`` times per repetition in this process (after a warm-up):
    experiment_io, against the model built in code and against hippynn's way (the structure unpickled without
    restriction, nothing verified). Seconds per load."""
    database, tm, controller, tracker = small_experiment()
    writer, files = _checkpoint_files(os.path.join(directory, "small-load"), database, tm, controller, tracker)
    save_payloads(writer, files)
    run = writer.directory
    structure, best = os.path.join(run, STRUCTURE_NAME), os.path.join(run, BEST_MODEL_NAME)

    def in_code():
        model = SmallNet()
        model.load_state_dict(torch.load(best, weights_only=True))

    def hippynn_way():
        model = torch.load(structure, weights_only=False)["training_modules"].model
        model.load_state_dict(torch.load(best, weights_only=True), assign=True)

    methods = {SMALL_OURS: lambda: load_model_from_cwd(directory=run),
               SMALL_TRUSTED: lambda: load_model_from_cwd(directory=run, trusted=True),
               SMALL_IN_CODE: in_code, SMALL_HIPPYNN: hippynn_way}

    def repeated(fn):
        def calls_of():
            for _ in range(calls):
                fn()
        return calls_of

    logger = logging.getLogger("experiment_io")
    level = logger.level
    logger.setLevel(logging.ERROR)  # trusted=True warns at every call
    try:
        times = harness.side_by_side({name: repeated(fn) for name, fn in methods.items()}, reps, seed=seed)
    finally:
        logger.setLevel(level)
    shutil.rmtree(os.path.join(directory, "small-load"), ignore_errors=True)
    return harness.summaries({name: [t / calls for t in samples] for name, samples in times.items()})


def small_model(directory, epochs, reps, seed):
    results, n_params, n_tensors, database = checkpoint_cost(directory, reps, seed)
    loads = small_loads(directory, reps, seed)
    epoch_runs = train_model_runs(directory, epochs, max(3, reps // 2), seed)
    epoch_time = epoch_runs["sync"]["epoch_time_s"]
    harness.rows(f"4. Small model ({n_params} parameters, {n_tensors} tensors per checkpoint): checkpoint cost per "
                 f"epoch (epoch of {len(database.splits['train'])} samples: {epoch_time * 1e3:.1f} ms)", results, BASELINE)
    fractions = {name: s["median"] / epoch_time for name, s in results.items()}
    for name, fraction in fractions.items():
        print(f"   {name}: {100 * fraction:.1f} % of the epoch time")
    hand = epoch_runs["hand"]["wall_per_epoch_s"]
    for mode, values in epoch_runs.items():
        what = "the loop written by hand, hippynn-style saves (no fsync)" if mode == "hand" else f"train_model, {mode} saves"
        print(f"   {what}: {values['wall_per_epoch_s'] * 1e3:.1f} ms per epoch (wall, saves included), "
              f"{values['wall_per_epoch_s'] / hand:.2f}x the hand-written loop")
    harness.rows(f"4b. The small model loaded for prediction, in one process (seconds per load; target: <= 1.5 x "
                 "the model built in code)", loads, SMALL_IN_CODE)
    for path in ("small-warm", "small-run", "small-plain", "small-async", "small-train-sync", "small-train-async",
                 "small-train-hand"):
        shutil.rmtree(os.path.join(directory, path), ignore_errors=True)
    return {"parameters": n_params, "tensors_per_checkpoint": n_tensors, "epoch_time_s": epoch_time,
            "results": results, "fraction_of_epoch": fractions, "train_model": epoch_runs, "loads": loads,
            "ratios": {"load_vs_in_code": loads[SMALL_OURS]["median"] / loads[SMALL_IN_CODE]["median"],
                       "load_vs_hippynn": loads[SMALL_OURS]["median"] / loads[SMALL_HIPPYNN]["median"]}}


def run(args, results):
    results["small"] = small_model(args.directory, 5 if args.quick else 10, args.reps if args.quick else 2 * args.reps,
                                   args.seed)


def summarize(results):
    if "small" not in results:
        return
    r = results["small"]["ratios"]
    harness.target_line("small model: load_model_from_cwd / built in code + torch.load + load_state_dict",
                        r["load_vs_in_code"], 1.5, "lower")
    harness.target_line("small model: load_model_from_cwd / hippynn's way (full pickle, unverified)",
                        r["load_vs_hippynn"], 1.5, "lower")
