"""The model of the subprocess tests: it uses dropout, so its training consumes random numbers."""
import torch


class DropoutNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))

    def forward(self, x, index):
        return self.body(x)
