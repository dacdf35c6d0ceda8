"""The model of the subprocess tests: it uses dropout, so its training consumes random numbers."""
import torch


class DropoutNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))

    def forward(self, x, index):
        return self.body(x)


def save_result(model, controller, metrics, path="result.pt"):
    """What the subprocess tests compare: final parameters, optimizer and scheduler state, metric history."""
    torch.save({
        "model": model.state_dict(),
        "optimizer": controller.optimizer.state_dict(),
        "schedulers": [s.state_dict() for s in controller.schedulers],
        "history": metrics.history,
        "epochs": metrics.epochs,
        "best_epoch": metrics.best_epoch,
        "best_model_state": metrics.best_model_state,
        "current_epoch": controller.current_epoch,
    }, path)
