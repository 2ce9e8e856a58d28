"""The search space of `distml tune`: `--param NAME=DIST:ARGS` parsed and checked, and a trial's sampled values split
into what sets the training and what goes to the model factory. Plain Python: Ray Tune's distributions are made from
these in distml/distributed/cv_tune.py, the one place that knows Tune."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from distml.errors import DistmlError

OPTION = "--param"
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
# the names that set the training; every other name is a keyword of the model factory
TRAINING_PARAMS = ("lr", "batch_size", "epochs", "weight_decay")
_INTEGER_PARAMS = ("batch_size", "epochs")
_FORMS = "loguniform:LOW:HIGH, uniform:LOW:HIGH, randint:LOW:HIGH or choice:A,B,C"


@dataclass(frozen=True)
class Param:
    """One searched parameter: `kind` one of DISTRIBUTIONS; `low` and `high` bound the numeric ones (randint's HIGH
    inclusive), `values` are a choice's."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    values: tuple = ()

    @property
    def log(self) -> bool:
        return self.kind == "loguniform"

    @property
    def spec(self) -> str:
        """The DIST:ARGS text that parses back to this parameter (what config.json keeps)."""
        if self.kind == "choice":
            return "choice:" + ",".join(json.dumps(value) for value in self.values)
        return f"{self.kind}:{self.low!r}:{self.high!r}"

    def example(self):
        """A value the driver builds its one check model with: a choice's first, else the lower bound."""
        return self.values[0] if self.kind == "choice" else self.low

    def candidates(self) -> list:
        """The values worth a look before the search: every choice, else both bounds."""
        return list(self.values) if self.kind == "choice" else [self.low, self.high]


def parse_param(text: str) -> Param:
    """`NAME=DIST:ARGS` as a Param, or a one-line DistmlError naming `--param`."""
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier():
        raise DistmlError(f"{text!r} is not NAME=DIST:ARGS with NAME a Python name", option=OPTION)
    return parse_spec(name, spec.strip())


def parse_spec(name: str, spec: str) -> Param:
    """The DIST:ARGS of parameter `name` (`loguniform:1e-4:1e-1`, `choice:16,64`) as a checked Param."""
    kind, _, args = spec.partition(":")
    if kind not in DISTRIBUTIONS:
        raise DistmlError(f"{name}: unknown distribution {kind!r}; write {_FORMS}", option=OPTION)
    if kind == "choice":
        return _checked(Param(name, kind, values=_choices(name, args)))
    bounds = args.split(":")
    if len(bounds) != 2:
        raise DistmlError(f"{name}={spec!r} is malformed; write {kind}:LOW:HIGH", option=OPTION)
    number = int if kind == "randint" else float
    try:
        low, high = (number(bound) for bound in bounds)
    except ValueError:
        kind_of = "integers" if kind == "randint" else "numbers"
        raise DistmlError(f"{name}={spec!r}: LOW and HIGH must be {kind_of}", option=OPTION) from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise DistmlError(f"{name}={spec!r}: LOW and HIGH must be finite", option=OPTION)
    if low > high or (low == high and kind != "randint"):
        raise DistmlError(f"{name}={spec!r}: LOW ({low:g}) must be below HIGH ({high:g})", option=OPTION)
    if kind == "loguniform" and low <= 0:
        raise DistmlError(f"{name}={spec!r}: log-uniform bounds must be positive", option=OPTION)
    return _checked(Param(name, kind, low, high))


def _choices(name: str, args: str) -> tuple:
    """choice:A,B,C: the values parsed as JSON where they parse (a whole list first, so `choice:[64,32],[128]` keeps
    its lists), otherwise kept as strings."""
    if not args.strip():
        raise DistmlError(f"{name}: choice needs at least one value, as in choice:A,B,C", option=OPTION)
    try:
        return tuple(json.loads(f"[{args}]"))
    except ValueError:
        pass
    values = []
    for text in args.split(","):
        try:
            values.append(json.loads(text))
        except ValueError:
            values.append(text.strip())
    return tuple(values)


def _checked(param: Param) -> Param:
    """The training parameters take only values the training can use."""
    if param.name not in TRAINING_PARAMS:
        return param
    values = param.candidates()
    if param.name in _INTEGER_PARAMS:
        if param.kind not in ("randint", "choice") or not all(_is_int(v) and v >= 1 for v in values):
            raise DistmlError(
                f"{param.name} takes whole numbers of at least 1: randint:LOW:HIGH or choice:A,B", option=OPTION
            )
    elif not all(_is_number(v) and (v > 0 if param.name == "lr" else v >= 0) for v in values):
        bound = "positive" if param.name == "lr" else "zero or more"
        raise DistmlError(f"{param.name} takes numbers {bound}", option=OPTION)
    return param


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_space(texts: list[str]) -> dict[str, str]:
    """Repeated `--param NAME=DIST:ARGS` as {name: DIST:ARGS}, each checked; a repeated name is refused."""
    space: dict[str, str] = {}
    for text in texts:
        param = parse_param(text)
        if param.name in space:
            raise DistmlError(f"{param.name} is given twice", option=OPTION)
        space[param.name] = param.spec
    return space


def space_params(space: dict[str, str]) -> dict[str, Param]:
    """A config's {name: DIST:ARGS} as checked Params, in order."""
    if not space:
        raise DistmlError("give at least one parameter to search, as in --param lr=loguniform:1e-4:1e-1", option=OPTION)
    return {name: parse_spec(name, spec) for name, spec in space.items()}


def model_params(space: dict[str, Param]) -> dict[str, Param]:
    """The parameters that go to the model factory as keywords."""
    return {name: param for name, param in space.items() if name not in TRAINING_PARAMS}


@dataclass(frozen=True)
class TrialTraining:
    """What one trial's sampled values change: training settings, the model factory's keywords, a weight decay."""

    settings: dict  # TrainSettings fields: lr, batch_size, epochs
    model_kwargs: dict
    weight_decay: float | None  # None when not searched or 0


def trial_training(values: dict) -> TrialTraining:
    """Split a trial's sampled values (numbers as JSON gives them back) into their three uses."""
    settings = {name: values[name] for name in ("lr", "batch_size", "epochs") if name in values}
    for name in _INTEGER_PARAMS:
        if name in settings:
            settings[name] = int(settings[name])
    if "lr" in settings:
        settings["lr"] = float(settings["lr"])
    kwargs = {name: value for name, value in values.items() if name not in TRAINING_PARAMS}
    decay = float(values.get("weight_decay") or 0.0)
    return TrialTraining(settings, kwargs, decay or None)  # none: the engine's own Adam, which stacked folds use


def adam_with_weight_decay(params, lr: float, weight_decay: float):
    """The optimizer a trial with a searched weight decay trains with: torch's Adam with that L2 penalty (the engine's
    own Adam, the stacked folds' too, has none, so such a trial trains its folds one at a time)."""
    import torch  # only where a trial trains

    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
