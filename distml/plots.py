"""matplotlib figures, written as PNG. The only module that imports matplotlib."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
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


def confusion_matrix(confusion: np.ndarray, path: Path, title: str = "Confusion matrix") -> Path:
    """Counts on the left, each row divided by its true-class total (recall on the diagonal) on the right."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    totals = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)
    for ax, values, what, fmt in ((axes[0], confusion, "counts", "d"), (axes[1], normalised, "row-normalised", ".2f")):
        image = ax.imshow(values, cmap="Blues")
        fig.colorbar(image, ax=ax, fraction=0.046)
        threshold = values.max() / 2
        for (row, column), value in np.ndenumerate(values):
            if value:
                colour = "white" if value > threshold else "black"
                ax.text(column, row, format(value, fmt), ha="center", va="center", fontsize=6.5, color=colour)
        ax.set_xticks(range(len(values)))
        ax.set_yticks(range(len(values)))
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"{title} ({what})")
    return _save(fig, path)


def comparison(frame: pd.DataFrame, path: Path, title: str = "Model comparison") -> Path:
    """Accuracy per model as bars with ± std where a model has one (K-fold), and training speed beside it."""
    fig, (acc_ax, speed_ax) = plt.subplots(1, 2, figsize=(11, 4))
    names = frame["model"].astype(str)
    errors = frame["accuracy_std"].fillna(0.0)
    bars = acc_ax.bar(names, frame["accuracy"], yerr=errors, capsize=4, color="tab:blue", alpha=0.85)
    acc_ax.bar_label(bars, labels=[f"{v:.4f}" for v in frame["accuracy"]], fontsize=8)
    low = max(0.0, float((frame["accuracy"] - errors).min()) - 0.05)
    acc_ax.set_ylim(low, 1.0)
    acc_ax.set_ylabel("accuracy (test; K-fold: validation mean)")
    acc_ax.set_title(f"{title}: accuracy")
    speed_ax.bar(names, frame["train_images_per_second"], color="tab:orange", alpha=0.85)
    speed_ax.set_yscale("log")
    speed_ax.set_ylabel("training images per second")
    speed_ax.set_title(f"{title}: training speed")
    for ax in (acc_ax, speed_ax):
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def sample_grid(images: np.ndarray, labels: np.ndarray, path: Path, per_class: int = 8) -> Path:
    """`per_class` images of every digit, one row per class."""
    classes = np.unique(labels)
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 0.9, len(classes) * 0.95))
    for row, digit in enumerate(classes):
        shown = np.flatnonzero(labels == digit)[:per_class]
        for column in range(per_class):
            ax = axes[row, column]
            ax.axis("off")
            if column < len(shown):
                ax.imshow(images[shown[column]], cmap="gray")
        axes[row, 0].set_title(str(digit), loc="left", fontsize=8, x=-0.35, y=0.3)
    fig.suptitle("MNIST samples, one row per class")
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
