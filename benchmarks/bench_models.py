"""The models of the benchmarks, in a module of their own so that the trust gate admits
them when a structure file that names them is loaded (their module is imported)."""
import torch


class BigModel(torch.nn.Module):
    """``n`` float32 parameters of ``numel`` elements each; the forward pass sums them."""

    def __init__(self, n, numel):
        super().__init__()
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(torch.full((numel,), 0.5)) for _ in range(n)])

    def forward(self, x):
        return x * sum(w[0] for w in self.weights)


class SmallNet(torch.nn.Module):
    """A small scientific regression model: 16 inputs, two hidden layers of 64, 5,313 parameters."""

    def __init__(self, n_in=16, hidden=64):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                                          torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def forward(self, x):
        return self.layers(x)
