"""A run folder's report for a person: report.md, and report.html with every figure embedded, rebuilt from the files
the run left (CSV, JSON, PNG), for every kind of run.

`build(run_dir)` reads config.json's "command" (a `distml compare` folder has none: its comparison.csv names it) and
hands the folder to that kind's function in KINDS, which returns the markdown; `html` turns that markdown into one
self-contained page (figures as data URIs, tables as HTML tables, no external reference). A new kind of run is one
function `(run_dir, header) -> markdown` and one entry in KINDS. Every command calls `build` at its end, and
`distml report RUN_DIR` calls it again on any finished or interrupted run; a file a run did not leave is left out.
"""

from __future__ import annotations

import base64
import html as html_text
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from distml.atomic import write_text
from distml.config import FinetuneConfig, HoldoutConfig, KFoldConfig, Serialized, SweepConfig, TuneConfig
from distml.errors import DistmlError
from distml.predictions import (
    ENSEMBLE_CONFUSION_FILE,
    ENSEMBLE_PER_CLASS_FILE,
    ENSEMBLE_SCORES_FILE,
    OOF_FILE,
    OOF_SCORES_FILE,
)
from distml.report import markdown_table
from distml.rundir import (
    CONFIG_FILE,
    FOLDS_FILE,
    HISTORY_FILE,
    MODEL_DIR,
    PER_CLASS_FILE,
    RESULTS_FILE,
    SUMMARY_FILE,
    TEST_METRICS_FILE,
)

REPORT_FILE = "report.md"
HTML_FILE = "report.html"
FOLD_MODELS_DIR = "fold_models"  # a K-fold run's kept fold models, and their ensemble
ENSEMBLE_DIR = "ensemble"
FOLD_ACCURACY_PLOT = "fold_accuracy.png"
LEARNING_CURVES_PLOT = "learning_curves.png"
OOF_CONFUSION_PLOT = "oof_confusion_matrix.png"
CONFUSION_PLOT = "confusion_matrix.png"
# the files `distml sweep` and `distml compare` write (sweep.py, compare.py: workflows, which import this module)
SWEEP_TRIALS_FILE, SWEEP_BEST_FILE, SWEEP_PLOT = "trials.csv", "best.json", "accuracy_vs_lr.png"
COMPARISON_FILE, COMPARISON_PLOT = "comparison.csv", "comparison.png"
# and `distml tune`'s (tune.py): trials.csv and best.json as the sweep's, the plot, and a nested run's outer folds
TUNE_PLOT, OUTER_FILE, OUTER_SUMMARY_FILE = "metric_vs_params.png", "outer.csv", "outer.json"
PAIRED_TESTS_FILE, PAIRED_DIFFERENCES_PLOT = "paired_tests.csv", "paired_differences.png"

Header = dict  # config.json: {"command", "options", "dataset", "versions", "created", ...}; {} for a comparison


def build(run_dir: Path) -> tuple[Path, Path]:
    """Write `run_dir`'s report.md and report.html from its files; returns their paths."""
    run_dir = Path(run_dir).expanduser().absolute()
    kind, header = run_kind(run_dir)
    markdown = KINDS[kind](run_dir, header)
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise DistmlError(f"{run_dir} cannot be written")
    return write_text(run_dir / REPORT_FILE, markdown), write_text(run_dir / HTML_FILE, html(markdown, run_dir))


def run_kind(run_dir: Path) -> tuple[str, Header]:
    """The kind of run in `run_dir` (a key of KINDS) and its config.json, or a one-line error."""
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        if (run_dir / COMPARISON_FILE).is_file():
            return "compare", {}
        raise DistmlError(
            f"{run_dir} holds no distml run (no {CONFIG_FILE}, nor the {COMPARISON_FILE} of a comparison)"
        )
    try:
        header = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise DistmlError(f"{config_path} cannot be read ({type(exc).__name__}): is it a distml run?") from None
    command = header.get("command") if isinstance(header, dict) else None
    if command not in KINDS:
        raise DistmlError(
            f"{run_dir} holds {f'a {command} run' if command else 'no run distml knows'}; reports are made for "
            f"{', '.join(KINDS)} runs"
        )
    return command, header


# ---- reading the folder ----


def _csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _required(path: Path, kind: str) -> Path:
    if not path.is_file():
        raise DistmlError(f"{path.parent}: the {kind} run has no {path.name} (unfinished?)")
    return path


def _config(config_type: type[Serialized], header: Header):
    """The run's options as its typed config."""
    try:
        return config_type.from_dict(header["options"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DistmlError(f"the {CONFIG_FILE} is not a {header.get('command')} run's ({exc})") from None


def _figure(run_dir: Path, name: str, caption: str) -> list[str]:
    """An image line and a blank line, or nothing when the run left no such file."""
    return [f"![{caption}]({name})", ""] if (run_dir / name).is_file() else []


def _table(frame: pd.DataFrame | None, before: str | None = None) -> list[str]:
    if frame is None:
        return []
    return ([before, ""] if before else []) + [markdown_table(frame), ""]


def _count(number: int, noun: str) -> str:
    """'1 epoch', '3 epochs'."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def _metric_values(frame: pd.DataFrame) -> dict[str, float]:
    """A metric,value table as a dict."""
    return dict(zip(frame["metric"], frame["value"], strict=True))


def _options_section(header: Header) -> list[str]:
    """Every option of the run (the cluster's as cluster.NAME), the data and the library versions."""
    rows = []
    for name, value in header.get("options", {}).items():
        if name == "out":  # the folder this report is in, perhaps moved since
            continue
        nested = value.items() if isinstance(value, dict) and name != "model_kwargs" else [("", value)]
        for key, inner in nested:
            if inner is not None and inner != {}:
                shown = json.dumps(inner) if isinstance(inner, dict | list) else str(inner)
                rows.append({"option": f"{name}.{key}" if key else name, "value": shown})
    if not rows:
        return []
    lines = ["## Options", "", markdown_table(pd.DataFrame(rows)), ""]
    dataset, versions = header.get("dataset") or {}, header.get("versions") or {}
    facts = []
    if dataset:
        facts.append(f"data: {dataset.get('source', '?')} ({dataset.get('location', '?')})")
    if versions:
        facts.append(", ".join(f"{name} {version}" for name, version in versions.items()))
    if "created" in header:
        facts.append(f"started {header['created']}")
    return lines + (["; ".join(facts) + ".", ""] if facts else [])


# ---- one function per kind of run ----


def _kfold(run_dir: Path, header: Header) -> str:
    """The run's settings, the summary with the corrected interval, the folds, the out-of-fold scores and, with a test
    set, the fold models' ensemble: in the order a reader asks for them."""
    config = _config(KFoldConfig, header)
    folds = pd.read_csv(_required(run_dir / FOLDS_FILE, "K-fold"))
    summary = pd.read_csv(_required(run_dir / SUMMARY_FILE, "K-fold"))
    accuracy = summary.set_index("metric").loc["val_accuracy"]
    repeats = f" x {config.repeats} repeats" if config.repeats > 1 else ""
    lines = [
        f"# K-fold cross-validation: {config.model} on {config.data}",
        "",
        f"{config.k} folds{repeats}, {_count(config.epochs, 'epoch')}, batch {config.batch_size}, lr {config.lr:g}, "
        f"seed {config.seed}; {len(folds)} of {config.splits} folds finished.",
        "",
        "## Summary",
        "",
        f"Mean validation accuracy **{accuracy['mean']:.4f}**, 95% CI {accuracy['corrected_ci95_low']:.4f}-"
        f"{accuracy['corrected_ci95_high']:.4f}, corrected for the overlap of the folds' training sets (Nadeau & "
        f"Bengio); the plain t interval, {accuracy['ci95_low']:.4f}-{accuracy['ci95_high']:.4f}, ignores it and is "
        "too narrow.",
        "",
        markdown_table(summary),
        "",
        "## Folds",
        "",
        markdown_table(folds.drop(columns=["node_id"], errors="ignore")),
        "",
        *_figure(run_dir, FOLD_ACCURACY_PLOT, "Validation accuracy per fold"),
        *_figure(run_dir, LEARNING_CURVES_PLOT, "Learning curves"),
    ]
    oof_scores = _csv(run_dir / OOF_SCORES_FILE)
    if oof_scores is not None:
        examples = int(_metric_values(oof_scores)["examples"])
        lines += [
            "## Out-of-fold predictions",
            "",
            f"Every example predicted by the model that did not train on it ({OOF_FILE}.{config.oof_format}); scores "
            f"over all {examples:,} predictions:",
            "",
            markdown_table(oof_scores),
            "",
            *_figure(run_dir, OOF_CONFUSION_PLOT, "Out-of-fold confusion matrix"),
        ]
    ensemble_scores = _csv(run_dir / ENSEMBLE_SCORES_FILE)
    if ensemble_scores is not None:
        scores = _metric_values(ensemble_scores)
        lines += [
            "## Test set: the fold models and their ensemble",
            "",
            f"The mean of all {int(scores['models'])} fold models' probabilities scores **{scores['accuracy']:.4f}** "
            f"on the test set, against {scores['mean_fold_accuracy']:.4f} for the mean single fold model "
            f"({scores['gain_over_mean_fold']:+.4f}).",
            "",
            markdown_table(ensemble_scores),
            "",
            *_table(_csv(run_dir / ENSEMBLE_PER_CLASS_FILE)),
            *_table(
                _csv(run_dir / ENSEMBLE_CONFUSION_FILE),
                "Confusion matrix of the ensemble on the test set (rows: true class):",
            ),
        ]
    if (run_dir / FOLD_MODELS_DIR).is_dir():
        lines += [f"Fold models: `{FOLD_MODELS_DIR}/`; their ensemble, a model like any other: `{ENSEMBLE_DIR}/`.", ""]
    return "\n".join(lines + _options_section(header))


def _trained_model(run_dir: Path, title: str, settings: str, header: Header) -> str:
    """A train or finetune run: its result, learning curves, per-class scores and confusion matrix."""
    results = _json(run_dir / RESULTS_FILE)
    metrics = _json(run_dir / TEST_METRICS_FILE) or {}
    lines = [f"# {title}{': ' + results['model'] if results else ''}", "", settings, ""]
    evaluated_on = (results or {}).get("evaluated_on", "test")
    held_out = "Test" if evaluated_on == "test" else "Validation-holdout (no test set)"
    if results is None:
        lines += [f"No {RESULTS_FILE}: the run did not finish; below is what it left.", ""]
    else:
        images = f" on {metrics['test_images']:,} examples" if "test_images" in metrics else ""
        loss = f", loss {metrics['loss']:.4f}" if "loss" in metrics else ""
        attempts = f"; {results['attempts']} attempts" if results.get("attempts", 1) > 1 else ""
        lines += [
            "## Result",
            "",
            f"{held_out} accuracy **{results['accuracy']:.4f}**, macro precision {results['precision']:.4f}, recall "
            f"{results['recall']:.4f}, F1 {results['f1']:.4f}{loss}{images}.",
            "",
            f"{results['parameters']:,} parameters, {_count(results['epochs'], 'epoch')} in "
            f"{results['train_seconds']:.1f} s ({results['train_images_per_second']:.0f} training images/s); predicts "
            f"{results['predict_images_per_second']:.0f} images/s{attempts}.",
            "",
        ]
    history = _csv(run_dir / HISTORY_FILE)
    if history is not None or (run_dir / LEARNING_CURVES_PLOT).is_file():
        lines += [
            "## Learning curves",
            "",
            *_figure(run_dir, LEARNING_CURVES_PLOT, "Learning curves"),
            *_table(history),
        ]
    per_class = _csv(run_dir / PER_CLASS_FILE)
    if per_class is not None or (run_dir / CONFUSION_PLOT).is_file():
        lines += [
            f"## {held_out.split(' (')[0]} set, per class",
            "",
            *_table(per_class),
            *_figure(run_dir, CONFUSION_PLOT, "Confusion matrix: counts and row-normalised"),
        ]
    if (run_dir / MODEL_DIR).is_dir():
        lines += [f"Exported model: `{MODEL_DIR}/` (state dict, model.json, torch.export program).", ""]
    return "\n".join(lines + _options_section(header))


def _train(run_dir: Path, header: Header) -> str:
    config = _config(HoldoutConfig, header)
    limit = f", a stratified subset of {config.limit:,} examples" if config.limit else ""
    settings = (
        f"{config.model} on {config.data}{limit}: {_count(config.epochs, 'epoch')}, batch {config.batch_size}, lr "
        f"{config.lr:g} ({config.lr_schedule}), seed {config.seed}; {config.val_fraction:g} of the examples held out "
        "for validation."
    )
    return _trained_model(run_dir, "Holdout training", settings, header)


def _finetune(run_dir: Path, header: Header) -> str:
    config = _config(FinetuneConfig, header)
    trained = "head only" if config.freeze_backbone else f"head and backbone (backbone lr {config.backbone_lr:g})"
    limit = f", a stratified subset of {config.limit:,} images" if config.limit else ""
    settings = (
        f"ResNet18 from {config.weights} weights at {config.image_size} px, {trained}, on Ray Train with "
        f"{_count(config.cluster.workers, 'DDP worker')}{limit}: {_count(config.epochs, 'epoch')}, batch "
        f"{config.batch_size}, head lr {config.lr:g}, seed {config.seed}."
    )
    return _trained_model(run_dir, "Fine-tune", settings, header)


def _sweep(run_dir: Path, header: Header) -> str:
    config = _config(SweepConfig, header)
    trials = pd.read_csv(_required(run_dir / SWEEP_TRIALS_FILE, "sweep"))
    best = _json(run_dir / SWEEP_BEST_FILE)
    backbone = "backbone frozen" if config.freeze_backbone else f"backbone trained too (lr {config.backbone_lr:g})"
    scored = (
        f"the holdout ({config.val_fraction:g} of the training images)"
        if config.cv is None
        else f"the mean over {config.cv} folds of the training images (a head per fold on the cached features)"
    )
    lines = [
        "# Learning-rate sweep: the ResNet18 head",
        "",
        f"{_count(config.trials, 'trial')}, head lr log-uniform in [{config.lr_min:g}, {config.lr_max:g}], up to "
        f"{_count(config.epochs, 'epoch')}, ASHA on {config.metric} (grace {config.grace_period}, reduction "
        f"{config.reduction_factor:g}); ResNet18 from {config.weights} weights at {config.image_size} px, {backbone}, "
        f"batch {config.batch_size}, seed {config.seed}. Each rate is scored on {scored}.",
        "",
        "## Best rate",
        "",
    ]
    if best is None:
        lines += ["No trial reported an epoch.", ""]
    else:
        unfinished = "" if best.get("complete", True) else "; the sweep did not finish"
        interval = (
            f"; its {best['metric']} over the {best['cv']} folds: std {best['std']:.4f}, corrected 95% interval "
            f"[{best['corrected_ci95_low']:.4f}, {best['corrected_ci95_high']:.4f}]"
            if "cv" in best
            else ""
        )
        lines += [
            f"Best lr **{best['lr']:.4g}** by {best['metric']}: validation accuracy {best['best_val_accuracy']:.4f}, "
            f"loss {best['best_val_loss']:.4f} (trial {best['trial']}, {_count(best['epochs'], 'epoch')}){interval}; "
            f"{best['trials_done']} of {best['trials']} trials done{unfinished}.",
            "",
        ]
        if "test_accuracy" in best:
            lines += [
                f"The final model, trained at that rate on every training image, scores **{best['test_accuracy']:.4f}**"
                f" on the test set (loss {best['test_loss']:.4f}); exported to `{MODEL_DIR}/`.",
                "",
            ]
    lines += _figure(run_dir, SWEEP_PLOT, "Best validation accuracy against the learning rate")
    if trials["error"].isna().all():
        trials = trials.drop(columns=["error"])
    trials["lr"] = [f"{lr:.3g}" for lr in trials["lr"]]  # rates span decades: four decimals would hide the small ones
    for score in ("val_accuracy", "val_loss"):  # with --cv: each interval in one column
        low, high = f"corrected_ci95_low_{score}", f"corrected_ci95_high_{score}"
        if low in trials:
            bounds = [f"[{a:.4f}, {b:.4f}]" for a, b in zip(trials[low], trials[high], strict=True)]
            trials.insert(trials.columns.get_loc(low), f"corrected_ci95_{score}", bounds)
            trials = trials.drop(columns=[low, high])
    lines += ["## Trials", "", markdown_table(trials), ""]
    return "\n".join(lines + _options_section(header))


def _tune(run_dir: Path, header: Header) -> str:
    config = _config(TuneConfig, header)
    space = ", ".join(f"`{name}={spec}`" for name, spec in config.params.items())
    early = (
        f"ASHA on the cross-fold mean (grace {config.grace_period}, reduction {config.reduction_factor:g})"
        if config.scheduler == "asha"
        else "no early stopping"
    )
    lines = [
        "# Hyperparameter search on K-fold scores",
        "",
        f"{_count(config.trials, 'trial')}, each a {config.k}-fold run of `{config.model}` for up to "
        f"{_count(config.max_epochs, 'epoch')}, drawn by {config.search} search (seed {config.seed}) from {space}; "
        f"ranked by the cross-fold mean of {config.metric}; {early}.",
        "",
    ]
    estimate = _json(run_dir / OUTER_SUMMARY_FILE)
    if config.outer_k is not None:
        lines += ["## Nested estimate", ""]
        if estimate is None:
            lines += ["No outer fold was scored.", ""]
        else:
            lines += [
                f"{estimate['metric']} **{estimate['mean']:.4f}** over {estimate['outer_folds_scored']} of "
                f"{estimate['outer_k']} outer folds (95% interval {estimate['corrected_ci95_low']:.4f} to "
                f"{estimate['corrected_ci95_high']:.4f}, corrected for the folds' shared training data): what the "
                "whole search, run on new data of this kind, would give. Each outer fold's own search is in its "
                "`outer_N/` folder.",
                "",
            ]
            stability = [{"parameter": name, **detail} for name, detail in estimate["stability"].items()]
            lines += _table(pd.DataFrame(stability), "How stable the choice was across the outer folds:")
        lines += _table(_csv(run_dir / OUTER_FILE), "The configuration each outer fold chose, and its score there:")
        return "\n".join(lines + _options_section(header))
    best = _json(run_dir / SWEEP_BEST_FILE)
    lines += ["## Best configuration", ""]
    if best is None:
        lines += ["No trial reported an epoch.", ""]
    else:
        chosen = ", ".join(f"`{name}={value}`" for name, value in best["params"].items())
        unfinished = "" if best.get("complete", True) else "; the search did not finish"
        lines += [
            f"{chosen}: {best['metric']} **{best['value']:.4f}** ± {best['std']:.4f} over {best['k']} folds (95% "
            f"interval {best['corrected_ci95_low']:.4f} to {best['corrected_ci95_high']:.4f}, corrected), "
            f"{_count(best['epochs'], 'epoch')}; {best['trials_done']} of {best['trials']} trials done{unfinished}.",
            "",
        ]
        if "model" in best:
            lines += [f"Trained on the data and exported to `{best['model']}`.", ""]
    lines += _figure(run_dir, TUNE_PLOT, f"Cross-fold mean of {config.metric} against each parameter")
    trials = _csv(run_dir / SWEEP_TRIALS_FILE)
    if trials is not None:
        if "error" in trials and trials["error"].isna().all():
            trials = trials.drop(columns=["error"])
        lines += ["## Trials", "", markdown_table(trials), ""]
    return "\n".join(lines + _options_section(header))


def _compare(run_dir: Path, header: Header) -> str:
    runs = pd.read_csv(run_dir / COMPARISON_FILE)
    shown = runs.drop(columns=["run_dir"]).assign(run=[Path(p).name for p in runs["run_dir"]])
    lines = [
        f"# Comparison of {len(runs)} runs",
        "",
        "## Runs",
        "",
        "Accuracy is a trained model's on its test set, and a K-fold run's mean validation accuracy (± std, with the "
        "95% interval corrected for the folds' shared training data).",
        "",
        markdown_table(shown),
        "",
        *_figure(run_dir, COMPARISON_PLOT, "Accuracy and training speed per run"),
    ]
    tests = _csv(run_dir / PAIRED_TESTS_FILE)
    if tests is not None and len(tests):
        metric, rope = tests["metric"].iloc[0], float(tests["rope"].iloc[0])
        lower = " (lower loss)" if str(metric).endswith("loss") else ""
        names = tests.assign(run_a=[Path(p).name for p in tests["run_a"]], run_b=[Path(p).name for p in tests["run_b"]])
        lines += [
            "## Decisions between the K-fold runs",
            "",
            f"Differences of {metric}, positive where A is better{lower}; equivalent within ±{rope:g}. Runs on the "
            "same folds: the corrected paired t-test and the Bayesian correlated t-test; runs on different folds: "
            "Welch's unpaired test; McNemar's exact test where both have test predictions.",
            "",
            *[f"- A `{row.run_a}` vs B `{row.run_b}`: {row.verdict}" for row in names.itertuples()],
            "",
            markdown_table(names.drop(columns=["metric", "rope", "t", "df", "verdict"])),
            "",
            *_figure(run_dir, PAIRED_DIFFERENCES_PLOT, "Per-fold differences with their 95% intervals"),
        ]
    return "\n".join(lines)


def _pipeline(run_dir: Path, header: Header) -> str:
    """The pipeline writes its own report.md, which links its stages' figures: it is the markdown."""
    return _required(run_dir / REPORT_FILE, "pipeline").read_text()


# config.json's "command" -> the markdown of that kind of run
KINDS: dict[str, Callable[[Path, Header], str]] = {
    "kfold": _kfold,
    "train": _train,
    "finetune": _finetune,
    "sweep": _sweep,
    "tune": _tune,
    "pipeline": _pipeline,
    "compare": _compare,
}


# ---- markdown to one self-contained HTML page ----

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; max-width: 1200px;
       margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.6em; border-bottom: 1px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #eaeef2; padding-bottom: .2em; }
code { font: 0.9em ui-monospace, SFMono-Regular, Menlo, monospace; background: #f6f8fa; padding: .1em .3em;
       border-radius: 4px; word-break: break-all; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; }
.table { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #d0d7de; padding: .25em .6em; white-space: nowrap; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fafbfc; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #59636e; font-size: 0.9em; }
.missing { color: #9a6700; }
"""
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif"}
_IMAGE_LINE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_INLINE = re.compile(r"`([^`]+)`|!\[([^\]]*)\]\(([^)\s]+)\)|\*\*(.+?)\*\*")
_SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")
_NUMBER = re.compile(r"^[-+]?(\d[\d,]*\.?\d*|\.\d+)([eE][-+]?\d+)?%?$")


def html(markdown: str, folder: Path) -> str:
    """One HTML page of the markdown distml writes (headings, paragraphs, **bold**, `code`, pipe tables, images,
    bullet lists, fenced code): images read from `folder` and embedded as data URIs, nothing referenced outside."""
    lines = markdown.splitlines()
    title = next((line.lstrip("#").strip() for line in lines if line.startswith("# ")), "distml report")
    body, paragraph, index = [], [], 0

    def flush() -> None:
        if paragraph:
            body.append(f"<p>{_inline(' '.join(paragraph), folder)}</p>")
            paragraph.clear()

    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        heading = re.match(r"^(#{1,6})\s+(.*)$", line)
        if not stripped:
            flush()
        elif stripped.startswith("```"):
            flush()
            end = next((i for i in range(index + 1, len(lines)) if lines[i].strip().startswith("```")), len(lines))
            body.append(f"<pre><code>{html_text.escape(chr(10).join(lines[index + 1 : end]))}</code></pre>")
            index = end
        elif heading:
            flush()
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline(heading.group(2), folder)}</h{level}>")
        elif stripped.startswith("|"):
            flush()
            end = index
            while end < len(lines) and lines[end].strip().startswith("|"):
                end += 1
            body.append(_html_table([row.strip() for row in lines[index:end]], folder))
            index = end - 1
        elif _IMAGE_LINE.fullmatch(stripped):
            flush()
            caption, source = _IMAGE_LINE.fullmatch(stripped).groups()
            body.append(
                f"<figure>{_image(source, caption, folder)}<figcaption>{html_text.escape(caption)}</figcaption>"
                "</figure>"
            )
        elif re.match(r"^[-*]\s+", stripped):
            flush()
            items = []
            while index < len(lines) and lines[index].strip():
                current = lines[index]
                if re.match(r"^\s*[-*]\s+", current):
                    items.append(re.sub(r"^\s*[-*]\s+", "", current))
                else:  # an item's continuation line
                    items[-1] += " " + current.strip()
                index += 1
            body.append("<ul>" + "".join(f"<li>{_inline(item, folder)}</li>" for item in items) + "</ul>")
            continue
        else:
            paragraph.append(stripped)
        index += 1
    flush()
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html_text.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def _html_table(rows: list[str], folder: Path) -> str:
    """A pipe table (header row, separator row, body rows) as an HTML table; numbers aligned right."""
    header, body = _cells(rows[0]), rows[2:] if len(rows) > 1 and _SEPARATOR.match(rows[1]) else rows[1:]
    head = "".join(f"<th>{_inline(cell, folder)}</th>" for cell in header)
    lines = []
    for row in body:
        cells = "".join(
            f'<td class="number">{html_text.escape(cell)}</td>'
            if _NUMBER.match(cell)
            else f"<td>{_inline(cell, folder)}</td>"
            for cell in _cells(row)
        )
        lines.append(f"<tr>{cells}</tr>")
    return (
        f'<div class="table"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
        + "\n".join(lines)
        + "\n</tbody></table></div>"
    )


def _inline(text: str, folder: Path) -> str:
    """`code`, inline images and **bold** of one line of text, the rest escaped."""
    out, position = [], 0
    for match in _INLINE.finditer(text):
        out.append(html_text.escape(text[position : match.start()]))
        code, caption, source, bold = match.groups()
        if code is not None:
            out.append(f"<code>{html_text.escape(code)}</code>")
        elif source is not None:
            out.append(_image(source, caption, folder))
        else:
            out.append(f"<strong>{_inline(bold, folder)}</strong>")
        position = match.end()
    out.append(html_text.escape(text[position:]))
    return "".join(out)


def _image(source: str, caption: str, folder: Path) -> str:
    """The image file `source` (relative to `folder`) as an <img> with a data URI; a note where it cannot be
    embedded (missing, not an image file, or not a file of the run)."""
    path = folder / source
    kind = IMAGE_TYPES.get(path.suffix.lower())
    if kind is None or "://" in source or not path.is_file():
        return f'<span class="missing">[figure not available: {html_text.escape(source)}]</span>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:{kind};base64,{data}" alt="{html_text.escape(caption)}">'
