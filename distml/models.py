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
    """Two conv blocks with BatchNorm, and a dropout head: 0.42 M parameters.

    With `--lr-schedule cosine` it passes 99% validation accuracy on MNIST (README, "Models"); at a constant rate it
    stays near 98.7%.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(*_conv_block(1, 32), *_conv_block(32, 64))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv_block(channels_in: int, channels_out: int) -> list[nn.Module]:
    """3x3 convolution (no bias: BatchNorm has one), BatchNorm, ReLU, 2x2 max-pool: halves the image side."""
    return [
        nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    ]


class StackedMLP(nn.Module):
    """G MLPs with their own weights, run as batched matrix products: (G, B, 1, 28, 28) -> (G, B, 10).

    Several folds' models train at once this way, one kernel per layer for all of them, which costs far less
    than G separate loops of small matrix products on a CPU. Built from (and unstacked back into) plain MLPs,
    so its initial weights are exactly those the folds would have alone.
    """

    def __init__(self, mlps: list[MLP]):
        super().__init__()
        layers = [[m for m in mlp.net if isinstance(m, nn.Linear)] for mlp in mlps]
        depth = len(layers[0])
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([fold[i].weight.detach().t() for fold in layers]).contiguous())
            for i in range(depth)
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([fold[i].bias.detach() for fold in layers]).unsqueeze(1)) for i in range(depth)
        )

    @property
    def size(self) -> int:
        return self.weights[0].shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(2)
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(bias, h, weight)
            if i < len(self.weights) - 1:
                h = torch.relu(h)
        return h

    @torch.no_grad()
    def unstack(self) -> list[MLP]:
        """Plain MLPs holding a copy of each model's current weights."""
        mlps = []
        for g in range(self.size):
            mlp = MLP(self.weights[-1].shape[-1]).to(self.weights[0].device)
            linears = [m for m in mlp.net if isinstance(m, nn.Linear)]
            for linear, weight, bias in zip(linears, self.weights, self.biases, strict=True):
                linear.weight.copy_(weight[g].t())
                linear.bias.copy_(bias[g, 0])
            mlps.append(mlp)
        return mlps


MODELS = {"mlp": MLP, "cnn": CNN}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    if name not in MODELS:
        raise DistmlError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}", option="--model")
    return MODELS[name](num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
