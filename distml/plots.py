"""matplotlib figures, written as PNG. The only module that imports matplotlib."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from distml.atomic import write_atomic  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def fold_accuracy(folds: pd.DataFrame, path: Path, title: str = "Validation accuracy per fold") -> Path:
    """A bar per fold, the mean as a line and one standard deviation shaded around it."""
    fig, ax = plt.subplots(figsize=(6, 4))
    accuracy = folds["val_accuracy"]
    ax.bar(folds["fold"].astype(str), accuracy, color="tab:blue", alpha=0.8, label="fold")
    mean, std = accuracy.mean(), accuracy.std(ddof=1) if len(accuracy) > 1 else 0.0
    ax.axhline(mean, color="tab:red", label=f"mean {mean:.4f}")
    ax.axhspan(mean - std, mean + std, color="tab:red", alpha=0.15, label=f"± std {std:.4f}")
    low = max(0.0, accuracy.min() - 3 * max(std, 0.002))
    ax.set_ylim(low, min(1.0, accuracy.max() + 3 * max(std, 0.002)))
    ax.set_xlabel("fold")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _save(fig, path)


def learning_curves(history: pd.DataFrame, path: Path, title: str = "Learning curves") -> Path:
    """Loss and accuracy per epoch, training dashed and validation solid, one colour per fold (or run)."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    group_key = "fold" if "fold" in history.columns else None
    groups = history.groupby(group_key) if group_key else [(None, history)]
    for name, rows in groups:
        label = f"fold {name}" if group_key else ""
        line = loss_ax.plot(rows["epoch"], rows["val_loss"], marker="o", label=f"{label} val".strip())[0]
        loss_ax.plot(rows["epoch"], rows["train_loss"], ls="--", color=line.get_color(), label=f"{label} train".strip())
        acc_ax.plot(
            rows["epoch"], rows["val_accuracy"], marker="o", color=line.get_color(), label=f"{label} val".strip()
        )
        acc_ax.plot(
            rows["epoch"], rows["train_accuracy"], ls="--", color=line.get_color(), label=f"{label} train".strip()
        )
    for ax, what in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    loss_ax.set_title(f"{title}: loss")
    acc_ax.set_title(f"{title}: accuracy")
    acc_ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def accuracy_vs_lr(trials: pd.DataFrame, path: Path, best_lr: float | None = None) -> Path:
    """Best validation accuracy of each sweep trial against its learning rate (log axis); hollow: stopped early."""
    fig, ax = plt.subplots(figsize=(6, 4))
    reported = trials[trials["epochs"] > 0]
    stopped = reported["stopped_early"].astype(bool)
    ax.scatter(reported.loc[~stopped, "lr"], reported.loc[~stopped, "best_val_accuracy"], label="ran every epoch")
    ax.scatter(
        reported.loc[stopped, "lr"],
        reported.loc[stopped, "best_val_accuracy"],
        facecolors="none",
        edgecolors="tab:blue",
        label="stopped early (ASHA)",
    )
    if best_lr is not None:
        ax.axvline(best_lr, color="tab:red", ls="--", label=f"best lr {best_lr:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("head learning rate")
    ax.set_ylabel("best validation accuracy")
    ax.set_title("Learning-rate sweep")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)
