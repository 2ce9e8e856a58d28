"""The networks: the workshop's MLP and a small CNN."""

from __future__ import annotations

import torch
from torch import nn

from distml.errors import DistmlError


class MLP(nn.Module):
    """784-128-64-10 with ReLU, as in the workshop."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Two conv blocks and a small head: about 99% on MNIST after a few epochs, cheap on a CPU."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


MODELS = {"mlp": MLP, "cnn": CNN}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    if name not in MODELS:
        raise DistmlError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}", option="--model")
    return MODELS[name](num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
