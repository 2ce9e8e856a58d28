"""matplotlib figures, written as PNG. The only module that imports matplotlib."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from distml.atomic import write_atomic  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _fold_labels(frame: pd.DataFrame) -> pd.Series:
    """Each row's fold as a label: "3", or "r1 f3" when the run has repeats."""
    if "repeat" in frame.columns and frame["repeat"].nunique() > 1:
        return "r" + frame["repeat"].astype(str) + " f" + frame["fold"].astype(str)
    return frame["fold"].astype(str)


def fold_accuracy(
    folds: pd.DataFrame,
    path: Path,
    title: str = "Validation accuracy per fold",
    interval: tuple[float, float] | None = None,
) -> Path:
    """A bar per fold, the mean as a line, and the 95% interval (`interval`, e.g. the corrected one) or else one
    standard deviation shaded around it; the legend beside the plot, not over the bars."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    accuracy = folds["val_accuracy"]
    ax.bar(_fold_labels(folds), accuracy, color="tab:blue", alpha=0.8, label="fold")
    mean, std = accuracy.mean(), accuracy.std(ddof=1) if len(accuracy) > 1 else 0.0
    ax.axhline(mean, color="tab:red", label=f"mean {mean:.4f}")
    if interval is not None and not np.isnan(interval[0]):
        low_band, high_band = interval
        ax.axhspan(low_band, high_band, color="tab:red", alpha=0.15, label=f"95% CI {low_band:.4f}-{high_band:.4f}")
    else:
        low_band, high_band = mean - std, mean + std
        ax.axhspan(low_band, high_band, color="tab:red", alpha=0.15, label=f"± std {std:.4f}")
    margin = 3 * max(std, 0.002)
    ax.set_ylim(max(0.0, min(accuracy.min(), low_band) - margin), min(1.0, max(accuracy.max(), high_band) + margin))
    ax.set_xlabel("fold")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


def learning_curves(history: pd.DataFrame, path: Path, title: str = "Learning curves") -> Path:
    """Loss and accuracy per epoch, training dashed and validation solid, one colour per fold (or run); with several
    folds, their validation mean as a thick line in a band of ± one standard deviation across the folds; integer epoch
    ticks; the legend beside the plots."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4))
    group_key = "fold" if "fold" in history.columns else None
    labelled = history.assign(curve=_fold_labels(history)) if group_key else history.assign(curve="")
    for name, rows in labelled.groupby("curve", sort=False):
        label = f"fold {name}" if group_key else ""
        line = loss_ax.plot(rows["epoch"], rows["val_loss"], marker="o", label=f"{label} val".strip())[0]
        loss_ax.plot(rows["epoch"], rows["train_loss"], ls="--", color=line.get_color(), label=f"{label} train".strip())
        acc_ax.plot(rows["epoch"], rows["val_accuracy"], marker="o", color=line.get_color())
        acc_ax.plot(rows["epoch"], rows["train_accuracy"], ls="--", color=line.get_color())
    if group_key and labelled["curve"].nunique() > 1:
        by_epoch = labelled.groupby("epoch")[["val_loss", "val_accuracy"]]
        mean, std = by_epoch.mean(), by_epoch.std(ddof=1).fillna(0.0)  # an epoch only one fold reached: no spread
        for ax, column in ((loss_ax, "val_loss"), (acc_ax, "val_accuracy")):
            low, high = mean[column] - std[column], mean[column] + std[column]
            ax.fill_between(mean.index, low, high, color="black", alpha=0.15, lw=0, label="± 1 std across folds")
            ax.plot(mean.index, mean[column], color="black", lw=2.5, label="mean val")
    for ax, what in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.set_title(f"{title}: loss")
    acc_ax.set_title(f"{title}: accuracy")
    fig.legend(*loss_ax.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    return _save(fig, path)


def confusion_matrix(
    confusion: np.ndarray, path: Path, title: str = "Confusion matrix", classes: list | None = None
) -> Path:
    """Counts on the left, each row divided by its true-class total (recall on the diagonal) on the right; the
    axes name the classes when `classes` is given."""
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
        names = [str(c) for c in classes] if classes is not None else [str(i) for i in range(len(values))]
        ax.set_xticks(range(len(values)), names, rotation=90 if max(map(len, names)) > 3 else 0)
        ax.set_yticks(range(len(values)), names)
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
    """Best validation accuracy of each sweep trial against its learning rate (log axis); hollow: stopped early; the
    legend beside the plot."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
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
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the points, never over them
    return _save(fig, path)


def paired_differences(tests: pd.DataFrame, differences: pd.DataFrame, path: Path) -> Path:
    """One row per pair of runs: the per-fold differences as points, their mean with its 95% interval (corrected, or
    Welch's for runs on different folds, which have no per-fold differences) as an error bar, the region of practical
    equivalence shaded and zero as a line. Positive: A (the first run) better."""
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.7 * len(tests)))
    rng = np.random.default_rng(0)  # the points' vertical jitter, the same on every drawing
    for row, test in enumerate(tests.itertuples(index=False)):
        pair = differences[(differences["run_a"] == test.run_a) & (differences["run_b"] == test.run_b)]
        jitter = rng.uniform(-0.15, 0.15, len(pair))
        ax.scatter(
            pair["difference"], row + jitter, s=14, color="tab:blue", alpha=0.6, label="fold" if row == 0 else None
        )
        errors = [[test.mean_difference - test.ci95_low], [test.ci95_high - test.mean_difference]]
        label = "mean, 95% interval (Welch)" if test.test.startswith("Welch") else "mean, corrected 95% interval"
        colour = "tab:orange" if test.test.startswith("Welch") else "tab:red"
        ax.errorbar(test.mean_difference, row, xerr=errors, fmt="D", color=colour, capsize=5, label=label)
    rope = float(tests["rope"].iloc[0])
    if rope > 0:
        ax.axvspan(-rope, rope, color="tab:green", alpha=0.15, label=f"equivalent (±{rope:g})")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(tests)))
    pairs = zip(tests["run_a"], tests["run_b"], strict=True)
    ax.set_yticklabels([f"A {Path(a).name}\nvs B {Path(b).name}" for a, b in pairs])
    ax.set_ylim(len(tests) - 0.5, -0.5)  # the first pair on top
    metric = tests["metric"].iloc[0]
    ax.set_xlabel(f"{metric} difference, positive: A better" + (" (lower loss)" if metric.endswith("loss") else ""))
    ax.set_title(f"Per-fold differences of {metric}")
    ax.grid(axis="x", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one entry per kind, however many pairs
    ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return _save(fig, path)


def metric_vs_params(scored: pd.DataFrame, space: dict, metric: str, k: int, path: Path) -> Path:
    """`distml tune`: the cross-fold mean of `metric` of each scored trial against each parameter of `space` (name ->
    search_space.Param), with its corrected 95% interval (log axis where log-uniform; hollow: stopped early)."""
    fig, axes = plt.subplots(1, len(space), figsize=(4.2 * len(space), 3.6), squeeze=False)
    for ax, (name, param) in zip(axes[0], space.items(), strict=True):
        values = scored[name]
        if param.kind == "choice":  # one position per choice, in the order given
            labels = [str(value) for value in param.values]
            values = scored[name].astype(str).map({label: i for i, label in enumerate(labels)})
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        middle = scored[f"mean_{metric}"]
        spread = [middle - scored[f"corrected_ci95_low_{metric}"], scored[f"corrected_ci95_high_{metric}"] - middle]
        ax.errorbar(values, middle, yerr=spread, fmt="none", ecolor="0.7", capsize=2)
        stopped = scored["stopped_early"].astype(bool).to_numpy()
        ax.scatter(values[~stopped], middle[~stopped], label="ran every epoch")
        ax.scatter(values[stopped], middle[stopped], facecolors="none", edgecolors="tab:blue", label="stopped early")
        if param.log:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(f"{metric} (mean of {k} folds)")
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)
