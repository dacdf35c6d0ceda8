r"""Checkpoints as a cache for re-runs: named checkpoint blocks, forks, cached evaluations, rollbacks.

A scientist re-runs a notebook from the top; every training block that already ran
is read back from its checkpoint instead of being trained again::

    model = Model("mnist-mlp", build(), "an MLP on MNIST")          # files under ckpts/mnist-mlp/
    with model.checkpoint(1) as cp:
        cp.setup(loss_cls=torch.nn.CrossEntropyLoss, optimizer_cls=torch.optim.Adam,
                 optimizer_args=dict(lr=5e-4))
        cp.train(train_dl, test_dl, watch="accuracy", epochs=20, metrics=[metric_accuracy])
    model.cache(1).evaluate(test_dl, metrics=[metric_accuracy])     # computed once, then read back

Each checkpoint is a directory ``<root>/<model id>/<checkpoint id>/`` written only
through the library's storage (atomic, fsynced, digested, committed in a manifest)
and read only through :func:`~experiment_io.verified_load` (verified, then
``weights_only``). It holds

* ``block.pt``: the block's record: its parent (the checkpoint the model stood at
  when the block began), the recipe of its components (class names and arguments),
  the result of each ``train()`` call in order with the random streams at its end,
  and whether the block ran to its end;
* ``state.pt``: the model, loss, optimizer and schedulers as the last ``train()``
  call left them;
* ``progress.pt`` while a ``train()`` call runs: everything needed to continue it
  exactly (states, random streams at the epoch's start and now, the position in the
  epoch, the history so far, the best epoch's states), written at each epoch's end,
  every ``save_every`` optimizer steps or ``save_every_seconds``, and at the batch
  where a signal stops the call;
* ``backup.pt``: the best epoch's states when the last ``train()`` call did not end
  on its best epoch and did not load it (``load_best=False``);
* ``experiment_structure.pt`` and ``best_model.pt``, so that
  ``load_model_from_cwd(directory=...)`` loads the checkpoint's model for prediction;
* ``cache_<name>.pt``: the cached results of :class:`Cache` operations.

The block, state, progress, backup and cache files carry the version of their
layout (:data:`~experiment_io.frontends.lineage.records.RECORD_VERSION`); a file of
a newer version is refused with an
:class:`~experiment_io.errors.IncompatibleCheckpointError` that says to upgrade.

A re-run returns a cached ``train()`` result without training and sets the random
streams to what they were when that call ended, so that a block trained after cached
ones draws the same numbers as in the first run. A block killed inside ``train()``
continues that call from its last progress save when the notebook is re-run, and
gives the same result as an uninterrupted run. A SIGTERM or SIGUSR1 inside
``train()`` (a scheduler's time limit) writes the progress save at the next batch
boundary and exits with status 75, as :func:`~experiment_io.train_model` does;
a Ctrl-C does the same, then raises :class:`KeyboardInterrupt`. Blocks record
their parent, so :meth:`Model.tree` (and ``experiment-io lineage DIR``) shows the
forks.
"""
from experiment_io.frontends.lineage.batches import metric
from experiment_io.frontends.lineage.blocks import CheckpointBlock
from experiment_io.frontends.lineage.cache import Cache
from experiment_io.frontends.lineage.listing import tree
from experiment_io.frontends.lineage.model import Model

__all__ = ["Model", "CheckpointBlock", "Cache", "metric", "tree"]
