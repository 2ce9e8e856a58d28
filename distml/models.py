"""The networks: the built-in MLP and CNN, any user factory of an nn.Module, and the normalisation step a model
carries inside itself.

A model is given as a built-in name ("mlp", "cnn"), a callable returning an nn.Module, or an import string
("package.module:function" or "path/to/file.py:function"). Every factory is called with the data's `num_classes`
and `input_shape` when it accepts them, plus the user's keyword arguments; `check_model` then runs one batch
through the result, so that a wrong network fails before any fold trains.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import itertools
import math
import re
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from distml.errors import DistmlError

OPTION = "--model"
ARG_OPTION = "--model-arg"
# Set by distml from the data, never by the user's keyword arguments.
DATA_ARGUMENTS = ("num_classes", "input_shape")

ModelSpec = str | Callable[..., nn.Module]


def exception_line(exc: BaseException) -> str:
    """'<type>: <first line of the message>', what a one-line error says about an exception."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class MLP(nn.Module):
    """Flatten, one Linear + ReLU per hidden width, and a Linear to the classes: 784-128-64-10 on MNIST, as in the
    workshop. It flattens (N, F) and (N, C, H, W) inputs alike."""

    def __init__(
        self, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28), hidden: int | Sequence[int] = (128, 64)
    ):
        super().__init__()
        self.input_shape = tuple(int(side) for side in input_shape)
        widths = [math.prod(self.input_shape), *((hidden,) if isinstance(hidden, int) else hidden)]
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in itertools.pairwise(widths):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Two conv blocks with BatchNorm, and a dropout head: 0.42 M parameters on MNIST.

    With `--lr-schedule cosine` it passes 99% validation accuracy on MNIST (README, "Models"); at a constant rate it
    stays near 98.7%. Each block halves the image side (rounding down), so the head's width follows the input.
    """

    def __init__(self, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28)):
        super().__init__()
        if len(input_shape) != 3 or min(input_shape[1:]) < 4:
            raise DistmlError(
                f"cnn needs images (C, H, W) of at least 4x4, not input of shape {tuple(input_shape)}; "
                "use mlp for tabular data",
                option=OPTION,
            )
        channels, height, width = (int(side) for side in input_shape)
        self.features = nn.Sequential(*_conv_block(channels, 32), *_conv_block(32, 64))
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * (height // 4) * (width // 4), 128),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(128, num_classes),
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


def _statistics_shape(size: int, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """How `size` statistics broadcast over (N, *input_shape): one per channel (C, 1, 1), one per feature (F,), or
    one per input value (input_shape itself)."""
    if input_shape and size == input_shape[0]:
        return (size,) + (1,) * (len(input_shape) - 1)
    if size == math.prod(input_shape):
        return input_shape
    raise ValueError(f"{size} statistics fit neither the channels nor the values of inputs of shape {input_shape}")


class Normalize(nn.Module):
    """(x - mean) / std, with the statistics as buffers: saved in the state dict and the exported program."""

    def __init__(self, mean, std, input_shape: Sequence[int]):
        super().__init__()
        input_shape = tuple(int(side) for side in input_shape)
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        self.register_buffer("mean", mean.detach().clone().reshape(_statistics_shape(mean.numel(), input_shape)))
        self.register_buffer("std", std.detach().clone().reshape(_statistics_shape(std.numel(), input_shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def normalization_stats(inputs: torch.Tensor, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) standard deviation per channel of images (N, C, H, W), over N, H and W, or per feature
    of tabular inputs (N, F), over N; of the rows in `index` only when given (a fold's training rows). A standard
    deviation below 1e-6 (a constant feature) becomes 1, so normalising never divides by zero."""
    values = inputs if index is None else inputs.index_select(0, index)
    if values.ndim < 2:
        raise ValueError(f"inputs of shape {tuple(values.shape)} have no channel or feature dimension")
    std, mean = torch.std_mean(values.float(), dim=[0, *range(2, values.ndim)], correction=0)
    return mean, torch.where(std < 1e-6, torch.ones_like(std), std)


def with_normalization(model: nn.Module, mean, std, input_shape: Sequence[int]) -> nn.Module:
    """The model preceded by its normalisation, so that the exported program and predict need nothing else."""
    return nn.Sequential(Normalize(mean, std, input_shape), model)


class StackedMLP(nn.Module):
    """G MLPs with their own weights, run as batched matrix products: (G, B, *input_shape) -> (G, B, num_classes).

    Several folds' models train at once this way, one kernel per layer for all of them, which costs far less
    than G separate loops of small matrix products on a CPU. Built from (and unstacked back into) plain MLPs,
    so its initial weights are exactly those the folds would have alone.

    `mean` and `std`, when given, normalise each fold's input with its own statistics: flat F-vectors over the
    flattened input, shape (G, 1, F) (or (G, F)). For images, per-channel statistics must be expanded to one value
    per pixel by the caller.
    """

    def __init__(self, mlps: list[MLP], mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        layers = [[m for m in mlp.net if isinstance(m, nn.Linear)] for mlp in mlps]
        depth = len(layers[0])
        self.input_shape = mlps[0].input_shape
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([fold[i].weight.detach().t() for fold in layers]).contiguous())
            for i in range(depth)
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([fold[i].bias.detach() for fold in layers]).unsqueeze(1)) for i in range(depth)
        )
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.register_buffer("mean", None if mean is None else self._fold_vectors(mean))
        self.register_buffer("std", None if std is None else self._fold_vectors(std))

    def _fold_vectors(self, statistics: torch.Tensor) -> torch.Tensor:
        size, features = self.weights[0].shape[:2]
        statistics = torch.as_tensor(statistics, dtype=torch.float32, device=self.weights[0].device)
        if statistics.numel() != size * features:
            raise ValueError(f"statistics of shape {tuple(statistics.shape)} are not one F-vector per model")
        return statistics.detach().clone().reshape(size, 1, features)

    @property
    def size(self) -> int:
        return self.weights[0].shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(2)
        if self.mean is not None:
            h = (h - self.mean) / self.std
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(bias, h, weight)
            if i < len(self.weights) - 1:
                h = torch.relu(h)
        return h

    @torch.no_grad()
    def unstack(self) -> list[nn.Module]:
        """Plain MLPs holding a copy of each model's current weights; `with_normalization` ones when the stack
        normalises, with each fold's statistics shaped as its input (one value per input value)."""
        hidden = [weight.shape[-1] for weight in self.weights[:-1]]
        models = []
        for g in range(self.size):
            mlp = MLP(self.weights[-1].shape[-1], self.input_shape, hidden).to(self.weights[0].device)
            linears = [m for m in mlp.net if isinstance(m, nn.Linear)]
            for linear, weight, bias in zip(linears, self.weights, self.biases, strict=True):
                linear.weight.copy_(weight[g].t())
                linear.bias.copy_(bias[g, 0])
            if self.mean is not None:
                mlp = with_normalization(mlp, self.mean[g, 0], self.std[g, 0], self.input_shape)
            models.append(mlp)
        return models


class FoldEnsemble(nn.Module):
    """Several models' mean class probability, as its logarithm: its argmax and softmax are the ensemble's
    prediction and probabilities, so it is used like any single model. Each member keeps its own normalisation."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probabilities = torch.stack([member(x).log_softmax(-1) for member in self.members])
        return torch.logsumexp(log_probabilities, dim=0) - math.log(len(self.members))  # log(mean p), stably


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": CNN}


def is_builtin(model: ModelSpec) -> bool:
    return isinstance(model, str) and model in MODELS


def can_stack(model: ModelSpec) -> bool:
    """Whether several folds of this model can train as one StackedMLP."""
    return isinstance(model, str) and model == "mlp"


def model_label(model: ModelSpec) -> str:
    """The model as config.json and the logs name it: the built-in name or import string as given, or
    'callable <module>.<qualname>' for a Python callable (which no later process can rebuild from the label)."""
    if isinstance(model, str):
        return model
    name = getattr(model, "__qualname__", None) or type(model).__qualname__
    return f"callable {getattr(model, '__module__', None) or '?'}.{name}"


_LOADING = threading.Lock()  # sys.modules and sys.path are process-wide: trainer threads load files in turn


def _load_file(path_text: str) -> ModuleType:
    """Execute a Python file as a module of its own name, its folder on sys.path only while it runs (so it can
    import the files beside it, as a script would)."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise DistmlError(f"{path_text} is not a file", option=OPTION)
    path = path.resolve()
    stem = re.sub(r"\W", "_", path.stem)
    name = f"distml_user_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"  # unique per file
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    with _LOADING:
        added = folder not in sys.path
        if added:
            sys.path.append(folder)
        sys.modules[name] = module  # the classes it defines find their module (pickle, dataclasses, inspect)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise DistmlError(f"{path_text} does not import ({exception_line(exc)})", option=OPTION) from None
        finally:
            if added and folder in sys.path:
                sys.path.remove(folder)
    return module


def _import(target: str) -> ModuleType:
    if target.endswith(".py"):
        return _load_file(target)
    try:
        return importlib.import_module(target)
    except Exception as exc:
        raise DistmlError(f"cannot import {target} ({exception_line(exc)})", option=OPTION) from None


def resolve_factory(model: ModelSpec) -> Callable[..., nn.Module]:
    """The factory of a built-in name, a callable returning an nn.Module, or an import string
    'package.module:function' or 'path/to/file.py:function' (relative to the current folder, or absolute).

    A file is executed each time it is resolved, under a module name of its own; resolving a model given as a file
    runs that file's code."""
    if isinstance(model, str):
        if model in MODELS:
            return MODELS[model]
        target, _, attribute = model.rpartition(":")
        if not target or not attribute:
            raise DistmlError(
                f"unknown model {model!r}; use {', '.join(MODELS)}, a package.module:function or file.py:function",
                option=OPTION,
            )
        factory = _import(target)
        for part in attribute.split("."):
            if not hasattr(factory, part):
                raise DistmlError(f"{target} has no attribute {attribute!r}", option=OPTION)
            factory = getattr(factory, part)
    else:
        factory = model
    if isinstance(factory, nn.Module):
        raise DistmlError(
            f"{model_label(model)} is a model, not a factory: give the function or class that builds it "
            "(every fold trains a fresh one)",
            option=OPTION,
        )
    if not callable(factory):
        raise DistmlError(f"{model_label(model)} is not callable (a {type(factory).__name__})", option=OPTION)
    return factory


def _call_arguments(factory: Callable, label: str, data_arguments: dict, model_kwargs: dict) -> dict:
    """The keyword arguments to call `factory` with, or a one-line error naming what it does not accept."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: give it what it is given
        return {**data_arguments, **model_kwargs}
    keywords = [p.name for p in signature.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    open_ended = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    accepted = [name for name in keywords if name not in DATA_ARGUMENTS]
    for key in model_kwargs:
        if key in DATA_ARGUMENTS:
            raise DistmlError(f"{key} comes from the data, not from a model argument", option=ARG_OPTION)
        if not open_ended and key not in keywords:
            raise DistmlError(
                f"{label} has no parameter {key!r}; it accepts {', '.join(accepted) or 'no model arguments'}",
                option=ARG_OPTION,
            )
    arguments = {k: v for k, v in data_arguments.items() if open_ended or k in keywords}
    arguments.update(model_kwargs)
    try:
        signature.bind(**arguments)
    except TypeError as exc:  # a required parameter without a value
        raise DistmlError(f"{label} cannot be called with {sorted(arguments)}: {exc}", option=ARG_OPTION) from None
    return arguments


def build_model(
    model: ModelSpec,
    num_classes: int = 10,
    input_shape: tuple[int, ...] = (1, 28, 28),
    model_kwargs: dict | None = None,
) -> nn.Module:
    """A fresh network: the factory called with `num_classes=` and `input_shape=` when its signature accepts them
    (by name, or through **kwargs), and with `model_kwargs`."""
    factory = resolve_factory(model)
    label = model_label(model)
    data_arguments = {"num_classes": int(num_classes), "input_shape": tuple(int(side) for side in input_shape)}
    arguments = _call_arguments(factory, label, data_arguments, dict(model_kwargs or {}))
    try:
        network = factory(**arguments)
    except DistmlError:
        raise
    except Exception as exc:
        raise DistmlError(f"{label} raised {exception_line(exc)}", option=OPTION) from None
    if not isinstance(network, nn.Module):
        raise DistmlError(f"{label} returned a {type(network).__name__}, not an nn.Module", option=OPTION)
    return network


@torch.no_grad()
def check_model(model: nn.Module, example: torch.Tensor, num_classes: int) -> None:
    """Run `example` (a small batch, N >= 2, on the CPU like the model) through the model in eval mode: it must
    return logits of shape (N, num_classes). Each module's train/eval mode is restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        output = model(example)
    except Exception as exc:
        raise DistmlError(
            f"forward failed on a batch of shape {tuple(example.shape)} ({exception_line(exc)})", option=OPTION
        ) from None
    finally:
        for module, training in modes:
            module.training = training
    expected = (example.shape[0], num_classes)
    got = f"shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else f"a {type(output).__name__}"
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
        raise DistmlError(
            f"forward must return logits of shape (N, num_classes) = {expected}; it returned {got} "
            f"for a batch of shape {tuple(example.shape)}",
            option=OPTION,
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
