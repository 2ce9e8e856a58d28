"""report.md and report.html of every kind of run, built from run folders written here as distml writes them (the
K-fold one by kfold_report.write_report itself, the comparison by compare.write_decision), with real PNGs; the HTML
parsed back: every figure embedded, every table there cell for cell, nothing referenced outside. And the figures'
promises: a band of ± one std across folds around the mean learning curve, legends outside the data."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from distml import evaluation, kfold_report, plots, report, run_report
from distml.compare import decide, write_decision
from distml.config import FinetuneConfig, HoldoutConfig, KFoldConfig, SweepConfig
from distml.datasets import Dataset
from distml.errors import DistmlError
from distml.folds import assignment_hash
from distml.rundir import outputs_file
from distml.train import Metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ("cat", "dog", "fox")
EXAMPLES, TEST_EXAMPLES, K = 90, 30, 3
VOID = {"meta", "img", "br", "hr", "link", "input"}


# ---- reading report.html back ----


class Page(HTMLParser):
    """The parts of report.html a test checks: images, tables (cell texts), references, and that tags nest."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.references: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.open: list[str] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.references += [attrs[name] for name in ("src", "href") if name in attrs]
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def markdown_tables(markdown: str) -> list[list[list[str]]]:
    """Every pipe table of the markdown as rows of cell texts (the separator row left out, inline markup removed)."""
    tables, current = [], None
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if re.fullmatch(r"\|(---\|)+", line):
                continue
            current = current if current is not None else []
            current.append([re.sub(r"\*\*|`", "", cell.strip()) for cell in line.strip("|").split("|")])
        elif current is not None:
            tables.append(current)
            current = None
    return tables


def check_page(run_dir: Path) -> tuple[str, Page]:
    """report.html against report.md: every image line embedded as the PNG file it names, every table there cell for
    cell, tags nested, nothing fetched from outside. Returns the markdown and the parsed page."""
    markdown = (run_dir / "report.md").read_text()
    text = (run_dir / "report.html").read_text()
    page = Page()
    page.feed(text)
    page.close()
    assert page.open == [] and text.startswith("<!DOCTYPE html>")
    figures = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", markdown, flags=re.MULTILINE)
    assert len(page.images) == len(figures)
    for source, figure in zip(page.images, figures, strict=True):
        assert source.startswith("data:image/png;base64,")
        data = base64.b64decode(source.removeprefix("data:image/png;base64,"), validate=True)
        assert data.startswith(PNG_SIGNATURE) and data == (run_dir / figure).read_bytes()
    assert page.tables == markdown_tables(markdown)
    assert all(reference.startswith("data:") for reference in page.references)
    assert "http://" not in text and "https://" not in text
    return markdown, page


def png(path: Path) -> Path:
    """A small real PNG (matplotlib's, through plots' writer)."""
    plots.fold_accuracy(pd.DataFrame({"fold": [0, 1], "val_accuracy": [0.8, 0.9]}), path)
    return path


# ---- a K-fold run, written by kfold_report itself ----


def write_kfold_run(path: Path, shift: float = 0.0, test: bool = True) -> Path:
    """A finished 3-fold run of 90 examples in 3 named classes, as the driver leaves it: config.json, then the fold
    results and predictions, then kfold_report.write_report's files (and report)."""
    rng = np.random.default_rng(int(shift * 1000))
    labels = np.arange(EXAMPLES) % 3
    test_labels = np.arange(TEST_EXAMPLES) % 3
    fold_of = np.arange(EXAMPLES) // (EXAMPLES // K)
    dataset = Dataset(np.zeros((EXAMPLES, 4), np.float32), labels.astype(np.int64), CLASSES, "arrays", "in memory")
    test_set = Dataset(np.zeros((TEST_EXAMPLES, 4), np.float32), test_labels.astype(np.int64), CLASSES, "arrays", "x")
    config = KFoldConfig(k=K, epochs=2, lr=0.002, seed=3, out=path)
    path.mkdir(parents=True)
    header = {
        "command": "kfold",
        "options": config.to_dict(),
        "dataset": {**dataset.summary(), "digest": "abc123"},
        "fold_assignment_hash": assignment_hash(fold_of),
        "versions": {"distml": "0.1.0"},
        "created": "2025-01-01T12:00:00",
    }
    (path / "config.json").write_text(json.dumps(header))

    def probabilities(truth: np.ndarray) -> np.ndarray:
        p = rng.dirichlet(np.ones(3), len(truth)) + np.eye(3)[truth] * (0.8 + shift)
        return p / p.sum(1, keepdims=True)

    done = {}
    for fold in range(K):
        val_index = np.flatnonzero(fold_of == fold)
        val_p = probabilities(labels[val_index])
        arrays = {"val_index": val_index, "probabilities": val_p}
        if test:
            arrays["test_probabilities"] = probabilities(test_labels)
        (path / "folds").mkdir(exist_ok=True)
        np.savez(outputs_file(path / "folds", fold), **arrays)
        accuracy = float((val_p.argmax(1) == labels[val_index]).mean())
        history = [
            {"epoch": e, "train_loss": 1 / e, "train_accuracy": 0.5 + 0.1 * e, "val_loss": 1.1 / e + 0.01 * fold}
            | {"val_accuracy": accuracy - 0.05 * (2 - e), "seconds": 0.1}
            for e in (1, 2)
        ]
        done[fold] = {
            "repeat": 0,
            "fold": fold,
            "train_size": EXAMPLES - len(val_index),
            "val_size": len(val_index),
            "val_accuracy": accuracy,
            "val_loss": 0.5 - 0.01 * fold,
            "precision_macro": accuracy - 0.01,
            "recall_macro": accuracy - 0.02,
            "f1_macro": accuracy - 0.015,
            "test_accuracy": 0.7 + 0.01 * fold if test else None,
            "test_loss": 0.6 if test else None,
            "epochs": 2,
            "train_seconds": 1.5,
            "node": "10.0.0.1",
            "node_id": "f00d",
            "device": "cpu",
            "attempts": 1,
            "history_json": json.dumps(history),
        }
    kfold_report.write_report(path, config, dataset, test_set if test else None, None, done)
    return path


def test_a_kfold_run_writes_its_report_from_its_files_and_the_page_embeds_it_all(tmp_path):
    run = write_kfold_run(tmp_path / "kfold")
    markdown, page = check_page(run)
    summary = pd.read_csv(run / "summary.csv").set_index("metric").loc["val_accuracy"]
    ensemble = pd.read_csv(run / "ensemble_scores.csv").set_index("metric")["value"]
    assert markdown.startswith("# K-fold cross-validation: mlp on mnist\n")
    assert "3 folds, 2 epochs, batch 64, lr 0.002, seed 3; 3 of 3 folds finished." in markdown
    assert f"**{summary['mean']:.4f}**" in markdown
    assert f"{summary['corrected_ci95_low']:.4f}-{summary['corrected_ci95_high']:.4f}" in markdown
    assert f"{summary['ci95_low']:.4f}-{summary['ci95_high']:.4f}" in markdown
    for section in ("## Folds", "## Out-of-fold predictions", "## Test set: the fold models and their ensemble"):
        assert section in markdown
    for figure in ("fold_accuracy.png", "learning_curves.png", "oof_confusion_matrix.png"):
        assert f"]({figure})" in markdown
    assert "all 90 predictions" in markdown and "(oof.csv)" in markdown
    assert f"scores **{ensemble['accuracy']:.4f}** on the test set" in markdown
    assert f"({ensemble['gain_over_mean_fold']:+.4f})" in markdown
    assert "node_id" not in markdown and "f00d" not in markdown  # the Ray node id is for machines
    assert "| lr | 0.002 |" in markdown  # the options, at the end
    # summary, folds, out-of-fold scores, ensemble scores, per class, confusion matrix, options
    assert len(page.tables) == 7 and len(page.images) == 3
    assert page.tables[5][0] == ["true", "predicted_cat", "predicted_dog", "predicted_fox"]
    assert [row[1] for row in page.tables[1][1:]] == ["0", "1", "2"]  # one row per fold


def test_a_file_the_run_did_not_leave_is_left_out(tmp_path):
    run = write_kfold_run(tmp_path / "kfold", test=False)  # no test set: no ensemble
    (run / "oof_scores.csv").unlink()
    (run / "learning_curves.png").unlink()
    run_report.build(run)
    markdown, page = check_page(run)
    assert "## Folds" in markdown and "](fold_accuracy.png)" in markdown
    for gone in ("## Out-of-fold predictions", "## Test set", "learning_curves.png"):
        assert gone not in markdown
    assert "test_accuracy" not in pd.read_csv(run / "summary.csv")["metric"].tolist()
    assert len(page.images) == 1  # fold accuracy (the out-of-fold confusion matrix is in the section left out)


def test_building_again_gives_the_same_report(tmp_path):
    run = write_kfold_run(tmp_path / "kfold")
    before = (run / "report.md").read_text(), (run / "report.html").read_text()
    assert run_report.build(run) == (run / "report.md", run / "report.html")
    assert ((run / "report.md").read_text(), (run / "report.html").read_text()) == before


# ---- train and finetune ----


def write_trained_run(path: Path, command: str, options: dict, results: dict) -> Path:
    """A finished train or finetune run: config.json, history.csv and its curves, the test evaluation (written by
    evaluation.write_test_report), model/ and results.json."""
    path.mkdir(parents=True)
    header = {"command": command, "options": options, "dataset": {"source": "mnist", "location": "/data"}}
    (path / "config.json").write_text(json.dumps(header))
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "train_loss": [0.9, 0.5, 0.3],
            "train_accuracy": [0.7, 0.85, 0.9],
            "val_loss": [0.6, 0.4, 0.35],
            "val_accuracy": [0.8, 0.88, 0.9123],
            "seconds": [2.0, 2.0, 2.1],
        }
    )
    history.to_csv(path / "history.csv", index=False)
    plots.learning_curves(history, path / "learning_curves.png")
    confusion = np.array([[40, 2, 1], [3, 35, 2], [0, 4, 13]])
    metrics = Metrics(0.3456, 0.88, 0.87, 0.86, 0.8642, confusion)
    evaluation.write_test_report(
        path, evaluation.TestEvaluation(metrics, int(confusion.sum()), 0.05), "mlp", list(CLASSES)
    )
    (path / "model").mkdir()
    (path / "results.json").write_text(json.dumps(results))
    return path


RESULTS = {
    "model": "mlp",
    "evaluated_on": "test",
    "accuracy": 0.88,
    "precision": 0.87,
    "recall": 0.86,
    "f1": 0.8642,
    "parameters": 109386,
    "epochs": 3,
    "train_seconds": 6.1,
    "train_images_per_second": 1234.5,
    "predict_images_per_second": 25000.0,
    "attempts": 1,
}


def test_a_train_run_reports_its_test_scores_curves_and_confusion_matrix(tmp_path):
    options = HoldoutConfig(model="mlp", epochs=3, lr=0.01, limit=1200).to_dict()
    run = write_trained_run(tmp_path / "train", "train", options, RESULTS)
    run_report.build(run)
    markdown, page = check_page(run)
    assert markdown.startswith("# Holdout training: mlp\n")
    assert "3 epochs, batch 64, lr 0.01 (constant)" in markdown and "1,200 examples" in markdown
    assert "Test accuracy **0.8800**, macro precision 0.8700, recall 0.8600, F1 0.8642, loss 0.3456" in markdown
    assert "on 100 examples" in markdown and "109,386 parameters" in markdown
    assert "| 3 | 0.3000 | 0.9000 | 0.3500 | 0.9123 | 2.1000 |" in markdown  # the last epoch
    assert "| fox | 0.8125 | 0.7647 |" in markdown  # 13 of 16 predicted fox are foxes, 13 of 17 foxes found
    assert "](learning_curves.png)" in markdown and "](confusion_matrix.png)" in markdown
    assert "`model/`" in markdown
    assert len(page.images) == 2 and len(page.tables) == 3  # history, per class, options


def test_a_finetune_run_names_its_workers_and_attempts(tmp_path):
    options = FinetuneConfig(weights="none", image_size=32, epochs=3).to_dict()
    results = {**RESULTS, "model": "resnet18-full", "attempts": 2}
    run = write_trained_run(tmp_path / "finetune", "finetune", options, results)
    run_report.build(run)
    markdown, _ = check_page(run)
    assert markdown.startswith("# Fine-tune: resnet18-full\n")
    assert "ResNet18 from none weights at 32 px, head and backbone" in markdown and "2 DDP workers" in markdown
    assert "; 2 attempts." in markdown and "| cluster.workers | 2 |" in markdown


def test_an_unfinished_train_run_says_so_and_shows_what_it_left(tmp_path):
    run = write_trained_run(tmp_path / "train", "train", HoldoutConfig().to_dict(), RESULTS)
    (run / "results.json").unlink()
    run_report.build(run)
    markdown, _ = check_page(run)
    assert "No results.json: the run did not finish" in markdown and "## Learning curves" in markdown


# ---- sweep, compare, pipeline ----


def test_a_sweep_reports_its_best_rate_and_every_trial(tmp_path):
    run = tmp_path / "sweep"
    run.mkdir()
    options = SweepConfig(trials=3, epochs=4, lr_min=1e-4, lr_max=1e-1, weights="none").to_dict()
    (run / "config.json").write_text(json.dumps({"command": "sweep", "options": options}))
    trials = pd.DataFrame(
        {
            "trial": ["t1", "t2", "t3"],
            "lr": [0.0003, 0.004, 0.05],
            "best_val_accuracy": [0.71, 0.9321, 0.64],
            "best_val_loss": [0.9, 0.25, 1.2],
            "epochs": [4, 4, 1],
            "stopped_early": [False, False, True],
            "seconds": [10.0, 11.0, 3.0],
            "status": ["done", "done", "done"],
            "attempts": [1, 1, 1],
            "error": ["", "", ""],
        }
    )
    trials.to_csv(run / "trials.csv", index=False)
    best = {"lr": 0.004, "metric": "val_accuracy", "value": 0.9321, "best_val_accuracy": 0.9321}
    best |= {"best_val_loss": 0.25, "trial": "t2", "epochs": 4, "trials_done": 3, "trials": 3, "complete": True}
    best |= {"test_accuracy": 0.9456, "test_loss": 0.2}
    (run / "best.json").write_text(json.dumps(best))
    plots.accuracy_vs_lr(trials, run / "accuracy_vs_lr.png", best_lr=0.004)
    run_report.build(run)
    markdown, page = check_page(run)
    assert "3 trials, head lr log-uniform in [0.0001, 0.1], up to 4 epochs" in markdown
    assert "Best lr **0.004** by val_accuracy: validation accuracy 0.9321" in markdown
    assert "3 of 3 trials done." in markdown and "scores **0.9456** on the test set" in markdown
    assert len(page.tables) == 2 and len(page.tables[0]) == 4  # the trials (a header and 3 rows), the options
    assert "error" not in page.tables[0][0]  # no trial failed
    assert len(page.images) == 1


def test_compare_writes_a_report_of_its_runs_and_decisions(tmp_path):
    a = write_kfold_run(tmp_path / "kfold-a", shift=0.3)
    b = write_kfold_run(tmp_path / "kfold-b", shift=0.0)
    out = tmp_path / "compare"
    comparison = decide([a, b])
    write_decision(comparison, out)
    markdown, page = check_page(out)
    test = comparison.tests.iloc[0]
    assert markdown.startswith("# Comparison of 2 runs\n")
    assert f"- A `kfold-a` vs B `kfold-b`: {test['verdict']}" in markdown
    assert f"| kfold-a | kfold-b | corrected paired t | 3 | {test['mean_a']:.4f} | {test['mean_b']:.4f} |" in markdown
    assert "](comparison.png)" in markdown and "](paired_differences.png)" in markdown
    assert len(page.tables) == 2 and [row[-1] for row in page.tables[0][1:]] == ["kfold-a", "kfold-b"]
    assert len(page.images) == 2 and "<li>" in (out / "report.html").read_text()


def test_a_pipeline_keeps_its_own_markdown_and_embeds_its_stages_figures(tmp_path):
    run = tmp_path / "pipeline"
    for stage in ("train-mlp", "kfold-mlp"):
        (run / stage).mkdir(parents=True)
    (
        png(run / "samples.png"),
        png(run / "train-mlp" / "learning_curves.png"),
        png(run / "kfold-mlp" / "fold_accuracy.png"),
    )
    (run / "config.json").write_text(json.dumps({"command": "pipeline", "options": {"k": 2}}))
    table = report.markdown_table(pd.DataFrame({"model": ["mlp", "mlp (2-fold)"], "accuracy": [0.9712, 0.9655]}))
    markdown = "\n".join(
        [
            "# distml pipeline report",
            "",
            'Options: `{"k": "2"}`',
            "",
            "![samples](samples.png)",
            "",
            "![learning curves](train-mlp/learning_curves.png)",
            "",
            table,
            "",
            "![fold accuracy](kfold-mlp/fold_accuracy.png)",
            "",
        ]
    )
    (run / "report.md").write_text(markdown)
    run_report.build(run)
    assert (run / "report.md").read_text() == markdown
    _, page = check_page(run)
    assert len(page.images) == 3 and page.tables[0][1] == ["mlp", "0.9712"]


# ---- what is no run ----


def test_a_folder_that_holds_no_run_is_one_line(tmp_path):
    with pytest.raises(DistmlError, match="holds no distml run"):
        run_report.build(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DistmlError, match="cannot be read"):
        run_report.build(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"command": "predict"}))
    with pytest.raises(DistmlError, match="a predict run; reports are made for kfold, train"):
        run_report.build(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"command": "kfold", "options": KFoldConfig().to_dict()}))
    with pytest.raises(DistmlError, match="the K-fold run has no folds.csv"):
        run_report.build(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"command": "pipeline", "options": {}}))
    with pytest.raises(DistmlError, match="the pipeline run has no report.md"):
        run_report.build(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # nothing written


def test_every_kind_of_run_has_a_report():
    assert set(run_report.KINDS) == {"kfold", "train", "finetune", "sweep", "tune", "pipeline", "compare"}


# ---- the markdown converter ----


def test_the_page_escapes_text_and_embeds_nothing_from_outside(tmp_path):
    png(tmp_path / "a.png")
    markdown = "\n".join(
        [
            "# Title <b>",
            "",
            "Text with **bold `code <x>`** and `a|b` & <script>alert(1)</script>",
            "a second line of the same paragraph.",
            "",
            "- first item",
            "  continued",
            "- second **item**",
            "",
            "![here](a.png)",
            "",
            "![remote](https://example.com/x.png)",
            "",
            "![missing](gone.png)",
            "",
            "| a | b |",
            "|---|---|",
            "| 1.5000 | text |",
            "",
            "```",
            "<raw> **not bold**",
            "```",
        ]
    )
    text = run_report.html(markdown, tmp_path)
    page = Page()
    page.feed(text)
    assert page.open == []
    assert "<title>Title &lt;b&gt;</title>" in text and "<h1>Title &lt;b&gt;</h1>" in text
    assert "<strong>bold <code>code &lt;x&gt;</code></strong>" in text and "<code>a|b</code>" in text
    assert "&lt;script&gt;" in text and "<script>" not in text
    assert "a second line of the same paragraph.</p>" in text
    assert "<ul><li>first item continued</li><li>second <strong>item</strong></li></ul>" in text
    assert len(page.images) == 1 and page.images[0].startswith("data:image/png;base64,")
    assert "https://" not in "".join(page.references) and "figure not available: gone.png" in text
    assert page.tables == [[["a", "b"], ["1.5000", "text"]]] and '<td class="number">1.5000</td>' in text
    assert "<pre><code>&lt;raw&gt; **not bold**</code></pre>" in text


# ---- the figures ----


@pytest.fixture
def figures(monkeypatch):
    """The figures plots draws, kept open instead of saved."""
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    yield drawn
    plots.plt.close("all")


def fold_history(folds: int) -> pd.DataFrame:
    rows = [
        {"repeat": 0, "fold": fold, "epoch": epoch, "train_loss": 1.0 / epoch, "train_accuracy": 0.5 + 0.1 * epoch}
        | {"val_loss": 1.0 / epoch + 0.1 * fold, "val_accuracy": 0.6 + 0.1 * epoch + 0.02 * fold, "seconds": 1.0}
        for fold in range(folds)
        for epoch in (1, 2, 3)
    ]
    return report.history_table(rows)


def band(ax) -> np.ndarray:
    """The (epoch, low, high) corners of the one shaded band on `ax`."""
    from matplotlib.collections import PolyCollection

    polygons = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(polygons) == 1
    return polygons[0].get_paths()[0].vertices


def test_learning_curves_shade_one_std_across_folds_around_the_mean(figures):
    history = fold_history(3)
    plots.learning_curves(history, Path("unused.png"))
    loss_ax, accuracy_ax = figures[0].axes
    for ax, column in ((loss_ax, "val_loss"), (accuracy_ax, "val_accuracy")):
        by_epoch = history.groupby("epoch")[column]
        vertices = band(ax)
        for epoch in (1, 2, 3):
            at = vertices[np.isclose(vertices[:, 0], epoch), 1]
            mean, std = by_epoch.mean()[epoch], by_epoch.std(ddof=1)[epoch]
            assert at.min() == pytest.approx(mean - std) and at.max() == pytest.approx(mean + std)
        assert all(float(tick).is_integer() for tick in ax.get_xticks())
    labels = [text.get_text() for text in figures[0].legends[0].get_texts()]
    assert "± 1 std across folds" in labels and "mean val" in labels


def test_one_run_gets_no_band(figures):
    plots.learning_curves(fold_history(1).drop(columns=["repeat", "fold"]), Path("unused.png"))
    assert all(len(ax.collections) == 0 for ax in figures[0].axes)


def test_the_sweep_legend_is_beside_the_points(figures):
    trials = pd.DataFrame({"lr": [1e-3, 1e-2], "best_val_accuracy": [0.8, 0.9], "epochs": [2, 1]})
    plots.accuracy_vs_lr(trials.assign(stopped_early=[False, True]), Path("unused.png"), best_lr=1e-2)
    figure = figures[0]
    figure.canvas.draw()
    ax = figure.axes[0]
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
