"""Model and metric of the Lennard-Jones example (see ``lennard_jones.py``).

They live in their own module, not in the script, because the run's structure
file pickles the model by reference to its class: a restart or a prediction must
be able to ``import lj_model``. A class defined in a script run as ``__main__``
could not be found again by another process.
"""
import torch


class LJEnergyNet(torch.nn.Module):
    """A small multilayer perceptron from a cluster descriptor to its energy.

    :param n_features: length of the descriptor (number of atom pairs).
    :param hidden: width of the hidden layers.
    :param feature_mean: per-feature mean of the training inputs (for scaling).
    :param feature_std: per-feature standard deviation of the training inputs.
    :param energy_mean: mean energy of the training set (the output offset).
    :param energy_std: standard deviation of the training energies (the output scale).
    """

    def __init__(self, n_features, hidden=64, *, feature_mean, feature_std, energy_mean, energy_std):
        super().__init__()
        # Buffers, not parameters: they are saved in the state_dict but never trained.
        self.register_buffer("feature_mean", torch.as_tensor(feature_mean, dtype=torch.get_default_dtype()))
        self.register_buffer("feature_std", torch.as_tensor(feature_std, dtype=torch.get_default_dtype()))
        self.register_buffer("energy_mean", torch.as_tensor(energy_mean, dtype=torch.get_default_dtype()))
        self.register_buffer("energy_std", torch.as_tensor(energy_std, dtype=torch.get_default_dtype()))
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(n_features, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, 1),
        )

    def forward(self, descriptor):
        scaled = (descriptor - self.feature_mean) / self.feature_std
        return self.layers(scaled) * self.energy_std + self.energy_mean


class MaxAbsError(torch.nn.Module):
    """The largest absolute error over the whole split (the Evaluator computes it on all samples at once)."""

    def forward(self, prediction, target):
        return (prediction - target).abs().max()
