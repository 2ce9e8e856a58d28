"""Adam without torch.optim: the same arithmetic, without its first-use cost.

Building any `torch.optim.Optimizer` imports `torch._dynamo` (its methods are wrapped by `torch._disable_dynamo`,
which imports it on first call): seconds of CPU, paid again by every fresh trainer process before its first step,
which for a small model is as long as a fold's training. This class calls the kernel `torch.optim.Adam(fused=True)`
calls, so its steps match torch's (the unit tests compare them), and falls back to the textbook update on devices
without that kernel.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

BETAS = (0.9, 0.999)
EPS = 1e-8


class Adam:
    """Adam (no weight decay, no AMSGrad) over one or more parameter groups, each with its own learning rate.

    `params` is an iterable of tensors, or of dicts {"params": tensors, "lr": float} as torch.optim takes.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3):
        params = list(params)
        if params and isinstance(params[0], dict):
            groups = [{"params": list(g["params"]), "lr": float(g.get("lr", lr))} for g in params]
        else:
            groups = [{"params": params, "lr": float(lr)}]
        for group in groups:
            group["initial_lr"] = group["lr"]
        self.param_groups: list[dict] = groups
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        self.fused = True  # until the device says it has no fused kernel

    def _parameters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def scale_lr(self, factor: float) -> None:
        """Set every group's rate to `factor` times its initial rate (a schedule's step)."""
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._parameters():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    def _state_of(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        if p not in self.state:
            self.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
        return self.state[p]

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state_of(p) for p in params]
            grads = [p.grad for p in params]
            steps = [s["step"] for s in states]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            torch._foreach_add_(steps, 1)
            if self.fused:
                try:
                    torch._fused_adam_(
                        params, grads, exp_avgs, exp_avg_sqs, [], steps,
                        lr=group["lr"], beta1=BETAS[0], beta2=BETAS[1], weight_decay=0.0, eps=EPS,
                        amsgrad=False, maximize=False,
                    )  # fmt: skip
                    continue
                except (RuntimeError, NotImplementedError):  # a device without the fused kernel: the plain update
                    self.fused = False
            for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
                _plain_adam(p, g, m, v, float(t), group["lr"])

    def state_dict(self) -> dict:
        """torch.optim's layout: per-parameter state keyed by position, and the groups' settings."""
        index = {p: i for i, p in enumerate(self._parameters())}
        state = {index[p]: {k: v.clone() for k, v in s.items()} for p, s in self.state.items()}
        groups, start = [], 0
        for group in self.param_groups:
            indices = list(range(start, start + len(group["params"])))
            groups.append({"lr": group["lr"], "initial_lr": group["initial_lr"], "params": indices})
            start += len(group["params"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict) -> None:
        params = self._parameters()
        sizes = [len(g["params"]) for g in saved["param_groups"]]
        if sizes != self._sizes():
            raise ValueError(f"saved optimizer has groups of {sizes} parameters, this one {self._sizes()}")
        for group, saved_group in zip(self.param_groups, saved["param_groups"], strict=True):
            group["lr"] = float(saved_group["lr"])
            group["initial_lr"] = float(saved_group.get("initial_lr", saved_group["lr"]))
        self.state = {}
        for i, s in saved["state"].items():
            p = params[int(i)]
            self.state[p] = {k: v.to(p.device, v.dtype if k == "step" else p.dtype).clone() for k, v in s.items()}

    def _sizes(self) -> list[int]:
        return [len(g["params"]) for g in self.param_groups]


def _plain_adam(
    p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: float, lr: float
) -> None:
    beta1, beta2 = BETAS
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(EPS)
    p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


class Scheduled:
    """A torch optimizer made by a user's factory, with what distml's loop asks of an optimizer besides torch's
    methods: `scale_lr`, so that `--lr-schedule` applies to it too."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def scale_lr(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, saved: dict) -> None:
        self.optimizer.load_state_dict(saved)
