"""The whole workshop on a local Ray: `distml pipeline` with a 2-worker DDP ResNet18 fine-tune (one TorchTrainer).

One run, checked from several sides: it is the slow part of the suite, so it runs once per module.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from distml.cli import app
from distml.export import load_model, load_program
from distml.kfold import saved_assignment

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture(scope="module")
def pipeline_run(local_ray, sample_dir, tmp_path_factory):
    from torchvision.models import resnet18

    folder = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    torch.save(resnet18(weights=None).state_dict(), folder / "backbone.pt")  # a 1000-class file, as ImageNet's
    args = [
        "pipeline",
        *("--data-dir", str(sample_dir), "--weights", str(folder / "backbone.pt"), "--image-size", "32"),
        *(
            "--limit",
            "400",
            "--batch-size",
            "32",
            "--epochs",
            "5",  # the MLP's (holdout and K-fold): seconds on 400 images; the fine-tune's are --finetune-epochs 1
            "--k",
            "2",
            "--workers",
            "2",
            "--out",
            str(folder / "run"),
        ),
    ]
    result = runner.invoke(app, args)
    (folder / "pipeline.log").write_text(result.output)  # progress lines with their times, for a slow or red run
    assert result.exit_code == 0, result.output
    return folder / "run", result


def test_finetune_ran_on_two_ddp_workers_with_checkpoints(pipeline_run):
    run, result = pipeline_run
    finetune = run / "finetune-resnet18"
    assert "2 DDP worker(s) on Ray Train" in result.stderr
    assert "resnet18-full: epoch 1/1" in result.stderr  # forwarded from the Train controller
    options = json.loads((finetune / "config.json").read_text())["options"]
    assert options["cluster"]["workers"] == 2 and options["image_size"] == 32 and not options["freeze_backbone"]
    checkpoints = list((finetune / "ray" / "finetune").glob("checkpoint_*/state.pt"))
    assert len(checkpoints) == 1  # the last epoch's, kept in the run's storage
    history = pd.read_csv(finetune / "history.csv")  # from the checkpoint: Train V2 keeps nothing else
    assert history["epoch"].tolist() == [1]
    assert history.loc[0, "val_loss"] > 0 and 0 <= history.loc[0, "val_accuracy"] <= 1
    results = json.loads((finetune / "results.json").read_text())
    assert results["ranks"] == [0, 1] and results["world_size"] == 2  # as the DDP workers recorded themselves
    assert results["parameters"] == 11_181_642
    assert (
        results["train_seconds"] > 0 and results["accuracy"] > 0.2
    )  # 12 steps of 32 images from random weights: above chance


def test_every_stage_left_its_files_and_report_shows_them(pipeline_run):
    run, _ = pipeline_run
    report = (run / "report.md").read_text()
    figures = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert len(figures) == 8
    for figure in figures:
        assert (run / figure).stat().st_size > 1000, figure
    for stage in ("train-mlp", "finetune-resnet18"):
        assert (run / stage / "model" / "model.pt2").is_file()
        assert f"{stage}/confusion_matrix.png" in report
    assert report.count("| class | precision | recall | f1 | support | predicted |") == 2


def test_compare_has_a_row_per_model_with_kfold_spread(pipeline_run):
    run, _ = pipeline_run
    table = pd.read_csv(run / "compare" / "comparison.csv").set_index("model")
    assert table.index.tolist() == ["mlp", "mlp (2-fold)", "resnet18-full"]
    assert table.loc["mlp (2-fold)", "evaluated_on"] == "2-fold validation"
    assert table.loc["mlp (2-fold)", "accuracy_std"] >= 0
    assert pd.isna(table.loc["mlp", "accuracy_std"])
    assert table.loc["mlp (2-fold)", "accuracy"] > 0.5  # --limit 400 reaches the K-fold too: 200 images per fold
    assert saved_assignment(run / "kfold-mlp").shape == (400,)  # the subset every stage trains on
    assert (table["train_images_per_second"] > 0).all()


def test_finetuned_model_predicts_as_evaluated(pipeline_run, sample_dir):
    run, _ = pipeline_run
    finetune = run / "finetune-resnet18"
    images = sample_dir / "t10k-images-idx3-ubyte.gz"
    result = runner.invoke(
        app, ["predict", str(finetune), str(images), "--labels", str(sample_dir / "t10k-labels-idx1-ubyte.gz"), "-q"]
    )
    assert result.exit_code == 0, result.output
    accuracy = json.loads((finetune / "test_metrics.json").read_text())["accuracy"]
    assert result.stdout.strip() == f"1000 images, accuracy {accuracy:.4f}"
    loaded = load_model(finetune)
    assert loaded.metadata["architecture"] == "resnet18" and loaded.metadata["image_size"] == 32
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(load_program(finetune)(x), loaded.model(x), atol=1e-4)
