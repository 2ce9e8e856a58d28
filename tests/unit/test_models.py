"""The model layer: built-in networks that adapt to the data, user factories by import string or file, the checks
of what a factory returns, normalisation inside the model, and saving and loading models that are not distml's."""

from __future__ import annotations

import json
import math
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

from distml.errors import DistmlError
from distml.export import PROGRAM_FILE, load_model, load_program, metadata, save_model
from distml.models import (
    CNN,
    MLP,
    MODELS,
    Normalize,
    StackedMLP,
    build_model,
    can_stack,
    check_model,
    count_parameters,
    is_builtin,
    model_label,
    normalization_stats,
    resolve_factory,
    with_normalization,
)

MYNETS = textwrap.dedent(
    """
    import math

    from torch import nn


    class Net(nn.Module):
        def __init__(self, num_classes, input_shape, hidden):
            super().__init__()
            self.body = nn.Sequential(
                nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
            )

        def forward(self, x):
            return self.body(x)


    class Branchy(Net):
        def forward(self, x):
            if x.sum() > 0:  # Python control flow on a tensor's value: torch.export cannot trace it
                return self.body(x)
            return -self.body(x)


    def build(num_classes, input_shape, hidden=32):
        return Net(num_classes, input_shape, hidden)


    def branchy(num_classes, input_shape, hidden=8):
        return Branchy(num_classes, input_shape, hidden)


    def broken(num_classes):
        raise RuntimeError("no such layer\\nsecond line of the message")


    def not_a_module(**kwargs):
        return "a string"


    def wrong_width(num_classes, input_shape):
        return nn.Flatten()


    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def mynets(tmp_path):
    """The path of a file of factories, as a user would write one."""
    path = tmp_path / "mynets.py"
    path.write_text(MYNETS)
    return path


def test_a_factory_from_a_file_gets_the_data_shape_and_the_model_arguments(mynets):
    path_before = list(sys.path)
    model = build_model(f"{mynets}:build", num_classes=3, input_shape=(4,))
    assert sys.path == path_before  # its folder is not left on sys.path
    assert type(model).__module__.startswith("distml_user_mynets_")
    assert model(torch.randn(2, 4)).shape == (2, 3)
    assert count_parameters(model) == 4 * 32 + 32 + 32 * 3 + 3
    smaller = build_model(f"{mynets}:build", 3, (4,), {"hidden": 16})
    assert count_parameters(smaller) == 4 * 16 + 16 + 16 * 3 + 3


def test_a_file_path_relative_to_the_current_folder(mynets, monkeypatch):
    monkeypatch.chdir(mynets.parent)
    assert count_parameters(build_model("mynets.py:build", 2, (5,))) == 5 * 32 + 32 + 32 * 2 + 2


def test_a_factory_from_a_package_module(mynets, monkeypatch):
    monkeypatch.syspath_prepend(str(mynets.parent))
    monkeypatch.delitem(sys.modules, "mynets", raising=False)
    try:
        factory = resolve_factory("mynets:build")
        assert factory.__module__ == "mynets"
        assert build_model("mynets:build", 2, (1, 3, 3), {"hidden": 4})(torch.randn(5, 1, 3, 3)).shape == (5, 2)
    finally:
        sys.modules.pop("mynets", None)


def test_model_arguments_a_factory_does_not_take_are_refused(mynets):
    with pytest.raises(DistmlError, match=r"no parameter 'width'; it accepts hidden$") as error:
        build_model(f"{mynets}:build", 3, (4,), {"width": 8})
    assert error.value.option == "--model-arg"
    with pytest.raises(DistmlError, match="num_classes comes from the data") as error:
        build_model(f"{mynets}:build", 3, (4,), {"num_classes": 8})
    assert error.value.option == "--model-arg"
    with pytest.raises(DistmlError, match="no parameter 'hidden'; it accepts no model arguments"):
        build_model(f"{mynets}:wrong_width", 3, (4,), {"hidden": 8})


def test_factories_that_fail_or_return_no_module_are_one_line_errors(mynets):
    with pytest.raises(DistmlError, match=r"broken raised RuntimeError: no such layer$") as error:
        build_model(f"{mynets}:broken", 3, (4,))
    assert error.value.option == "--model" and "\n" not in str(error.value)
    with pytest.raises(DistmlError, match="not_a_module returned a str, not an nn.Module"):
        build_model(f"{mynets}:not_a_module", 3, (4,))


def test_import_strings_that_do_not_resolve(mynets, tmp_path):
    cases = {
        "resnet50": "unknown model 'resnet50'; use mlp, cnn, a package.module:function or file.py:function",
        f"{tmp_path / 'missing.py'}:build": "missing.py is not a file",
        f"{mynets}:nothing": "has no attribute 'nothing'",
        f"{mynets}:NOT_CALLABLE": "NOT_CALLABLE is not callable (a int)",
        "no_such_package_for_distml:build": "cannot import no_such_package_for_distml "
        "(ModuleNotFoundError: No module named 'no_such_package_for_distml')",
    }
    for model, message in cases.items():
        with pytest.raises(DistmlError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
            resolve_factory(model)
        assert error.value.option == "--model"
    (tmp_path / "bad.py").write_text("def build(:\n")
    with pytest.raises(DistmlError, match=r"bad.py does not import \(SyntaxError: "):
        resolve_factory(f"{tmp_path / 'bad.py'}:build")
    assert not any(name.startswith("distml_user_bad_") for name in sys.modules)
    with pytest.raises(DistmlError, match="is a model, not a factory"):
        resolve_factory(MLP())


def test_callables_builtins_and_labels():
    def tiny(num_classes, input_shape):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))

    assert build_model(tiny, 4, (2, 3))(torch.randn(5, 2, 3)).shape == (5, 4)
    assert model_label(tiny) == f"callable {__name__}.test_callables_builtins_and_labels.<locals>.tiny"
    assert model_label("mlp") == "mlp" and model_label("nets.py:build") == "nets.py:build"
    assert is_builtin("cnn") and not is_builtin("nets.py:build") and not is_builtin(tiny)
    assert can_stack("mlp") and not can_stack("cnn") and not can_stack(MLP)
    assert set(MODELS) == {"mlp", "cnn"}
    assert isinstance(build_model("cnn", 10), CNN)  # num_classes stays positional


def test_check_model_wants_logits_of_n_by_classes(mynets):
    wrong = build_model(f"{mynets}:wrong_width", 3, (4,))
    with pytest.raises(DistmlError, match=r"\(N, num_classes\) = \(2, 3\); it returned shape \(2, 4\)") as error:
        check_model(wrong, torch.zeros(2, 4), 3)
    assert error.value.option == "--model"
    model = build_model(f"{mynets}:build", 3, (4,))
    check_model(model, torch.zeros(2, 4), 3)
    with pytest.raises(DistmlError, match=r"forward failed on a batch of shape \(2, 5\) \(RuntimeError: "):
        check_model(model, torch.zeros(2, 5), 3)
    cnn = build_model("cnn").train()
    check_model(cnn, torch.zeros(2, 1, 28, 28), 10)
    assert all(module.training for module in cnn.modules())  # its train mode is restored


def test_the_builtin_networks_keep_their_state_dicts():
    mlp = {k: tuple(v.shape) for k, v in build_model("mlp").state_dict().items()}
    assert mlp == {
        "net.1.weight": (128, 784),
        "net.1.bias": (128,),
        "net.3.weight": (64, 128),
        "net.3.bias": (64,),
        "net.5.weight": (10, 64),
        "net.5.bias": (10,),
    }
    cnn = build_model("cnn").state_dict()
    assert cnn["features.0.weight"].shape == (32, 1, 3, 3) and cnn["head.1.weight"].shape == (128, 64 * 7 * 7)
    assert count_parameters(build_model("cnn")) == 421_738  # 0.42 M


@pytest.mark.parametrize("input_shape", [(3, 16, 16), (1, 8, 8), (2, 9, 5)])
def test_the_builtin_networks_adapt_to_images(input_shape):
    x = torch.randn(2, *input_shape)
    for name in MODELS:
        model = build_model(name, num_classes=5, input_shape=input_shape).eval()
        assert model(x).shape == (2, 5)
    assert build_model("mlp", 5, input_shape).net[1].in_features == math.prod(input_shape)


def test_the_mlp_takes_tabular_data_and_the_cnn_refuses_it():
    model = build_model("mlp", 3, (4,), {"hidden": [8]})
    assert model(torch.randn(6, 4)).shape == (6, 3)
    assert [m.out_features for m in model.net if isinstance(m, nn.Linear)] == [8, 3]
    for shape in [(4,), (1, 3, 8)]:
        with pytest.raises(
            DistmlError, match=r"cnn needs images \(C, H, W\) of at least 4x4.*use mlp for tabular"
        ) as error:
            build_model("cnn", 3, shape)
        assert error.value.option == "--model"


def test_normalization_stats_by_hand():
    tabular = torch.tensor([[1.0, 5.0], [3.0, 5.0], [8.0, 5.0]])
    mean, std = normalization_stats(tabular, torch.tensor([0, 1]))
    assert mean.tolist() == [2.0, 5.0] and std.tolist() == [1.0, 1.0]  # feature 1 is constant: std 1
    images = torch.tensor([[[[0.0, 2.0]], [[7.0, 7.0]]], [[[4.0, 6.0]], [[7.0, 7.0]]]])  # (2, 2, 1, 2)
    mean, std = normalization_stats(images)
    assert mean.tolist() == [3.0, 7.0]
    assert std.tolist() == pytest.approx([math.sqrt(5.0), 1.0])  # population std of 0, 2, 4, 6


def test_normalize_is_a_step_of_the_model():
    step = Normalize(torch.tensor([3.0, 7.0]), torch.tensor([2.0, 1.0]), (2, 1, 2))
    assert step.mean.shape == (2, 1, 1)
    images = torch.tensor([[[[1.0, 5.0]], [[7.0, 9.0]]]])
    assert step(images).tolist() == [[[[-1.0, 1.0]], [[0.0, 2.0]]]]
    features = Normalize([2.0, 5.0], [1.0, 1.0], (2,))
    assert features.std.shape == (2,) and features(torch.tensor([[1.0, 5.0]])).tolist() == [[-1.0, 0.0]]
    model = with_normalization(build_model("mlp", 3, (2,)), [2.0, 5.0], [1.0, 1.0], (2,))
    assert list(model.state_dict())[:2] == ["0.mean", "0.std"]
    assert torch.equal(model(torch.tensor([[1.0, 5.0]])), model[1](torch.tensor([[-1.0, 0.0]])))


def test_a_stack_without_statistics_is_unchanged():
    torch.manual_seed(0)
    mlps = [MLP(4, (5,), hidden=(7,)) for _ in range(3)]
    stack = StackedMLP(mlps)
    assert [k for k in stack.state_dict()] == ["weights.0", "weights.1", "biases.0", "biases.1"]
    x = torch.randn(3, 6, 5)
    torch.testing.assert_close(stack(x), torch.stack([mlp(x[g]) for g, mlp in enumerate(mlps)]))
    for mlp, unstacked in zip(mlps, stack.unstack(), strict=True):
        assert isinstance(unstacked, MLP) and unstacked.input_shape == (5,)
        for a, b in zip(mlp.parameters(), unstacked.parameters(), strict=True):
            assert torch.equal(a, b)


def test_a_stack_normalises_each_fold_like_its_unstacked_model():
    torch.manual_seed(1)
    input_shape = (2, 3, 3)
    mlps = [MLP(4, input_shape) for _ in range(2)]
    channel_means = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    channel_stds = torch.tensor([[2.0, 0.5], [1.0, 3.0]])
    pixels = 9  # the caller spreads per-channel statistics over the flattened input

    def flat(values):
        return values.repeat_interleave(pixels, dim=1).unsqueeze(1)

    stack = StackedMLP(mlps, flat(channel_means), flat(channel_stds))
    assert stack.mean.shape == (2, 1, 18)
    x = torch.randn(2, 5, *input_shape)
    unstacked = stack.unstack()
    torch.testing.assert_close(stack(x), torch.stack([unstacked[g](x[g]) for g in range(2)]))
    for g in range(2):
        by_channel = with_normalization(mlps[g], channel_means[g], channel_stds[g], input_shape)
        torch.testing.assert_close(unstacked[g](x[g]), by_channel(x[g]))
        assert unstacked[g][0].mean.shape == input_shape
    with pytest.raises(ValueError, match="both mean and std"):
        StackedMLP(mlps, flat(channel_means))


def test_a_model_torch_export_cannot_trace_is_saved_without_a_program(mynets, tmp_path):
    torch.manual_seed(2)
    architecture = f"{mynets}:branchy"
    model = build_model(architecture, 3, (4,), {"hidden": 16}).eval()
    info = metadata(
        architecture,
        model,
        classes=["a", "b", "c"],
        input_shape=(4,),
        normalisation={"kind": "none"},
        model_kwargs={"hidden": 16},
        num_classes=3,
    )
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / PROGRAM_FILE).write_bytes(b"left by an earlier save")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_model(folder, model, info)
    ours = [w for w in caught if issubclass(w.category, UserWarning) and "torch.export" in str(w.message)]
    assert len(ours) == 1 and ours[0].filename.endswith("export.py")  # distml's: the CLI shows it as one line
    message = str(ours[0].message)
    assert message.startswith(f"torch.export could not export {architecture} (") and "\n" not in message
    assert message.endswith("); saved its state dict and model.json only")
    saved = json.loads((folder / "model.json").read_text())
    assert saved["files"] == {"state_dict": "model.pt", "program": None}
    assert saved["export_error"] in message and saved["classes"] == ["a", "b", "c"]
    assert (folder / "model.pt").is_file() and not (folder / PROGRAM_FILE).exists()
    loaded = load_model(folder)
    x = torch.randn(5, 4)
    assert torch.equal(loaded.model(x), model(x)) and torch.equal(loaded.model(-x), model(-x))
    with pytest.raises(DistmlError, match="no exported program: torch.export failed when it was saved"):
        load_program(folder)


def test_a_normalised_model_round_trips_through_its_files(tmp_path):
    torch.manual_seed(3)
    input_shape = (3, 8, 8)
    mean, std = torch.tensor([0.2, 0.4, 0.6]), torch.tensor([1.5, 2.0, 0.5])
    model = with_normalization(build_model("cnn", 4, input_shape), mean, std, input_shape).eval()
    info = metadata(
        "cnn",
        model,
        classes=[10, 20, 30, 40],
        input_shape=input_shape,
        normalisation={"kind": "in-model"},
        num_classes=4,
        normalized_in_model=True,
    )
    save_model(tmp_path, model, info)
    loaded = load_model(tmp_path)
    assert loaded.metadata["classes"] == [10, 20, 30, 40] and loaded.metadata["input_shape"] == [3, 8, 8]
    assert torch.equal(loaded.model[0].mean, model[0].mean)
    x = torch.randn(5, *input_shape)
    assert torch.equal(loaded.model(x), model(x))
    torch.testing.assert_close(torch.export.load(tmp_path / PROGRAM_FILE).module()(x), model(x))


def test_an_unstacked_normalised_mlp_loads_with_its_per_value_statistics(tmp_path):
    input_shape = (1, 4, 4)
    stack = StackedMLP([MLP(3, input_shape)], torch.rand(1, 1, 16), torch.rand(1, 1, 16) + 0.5)
    model = stack.unstack()[0].eval()
    info = metadata("mlp", model, input_shape=input_shape, num_classes=3, normalized_in_model=True)
    torch.save(model.state_dict(), tmp_path / "model.pt")  # what save_model writes first, without the export
    (tmp_path / "model.json").write_text(json.dumps(info))
    x = torch.randn(2, *input_shape)
    assert torch.equal(load_model(tmp_path).model(x), model(x))


def test_a_model_given_as_a_callable_cannot_be_rebuilt(tmp_path):
    def tiny(num_classes, input_shape):
        return nn.Linear(input_shape[0], num_classes)

    model = build_model(tiny, 2, (3,))
    info = metadata(tiny, model, input_shape=(3,), num_classes=2)
    assert info["architecture"].startswith("callable tests.unit.test_models.") or info["architecture"].startswith(
        "callable test_models."
    )
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps(info))
    with pytest.raises(DistmlError, match="given as a Python callable .* torch.load the state dict"):
        load_model(tmp_path)


def test_mnist_metadata_is_unchanged():
    info = metadata("mlp", build_model("mlp"))
    assert info["classes"] == [str(d) for d in range(10)] and info["input_shape"] == [1, 28, 28]
    assert info["normalisation"] == {"scale": "pixel / 255", "mean": 0.1307, "std": 0.3081}


def test_the_built_in_resnet18_fits_small_colour_or_grey_images_and_refuses_tabular_data(tmp_path):
    """`--model resnet18`: torchvision's ResNet18 behind the adapter, for (C, H, W) images of 1 or 3 channels, with
    the run's class count; exported and rebuilt by load_model with its normalisation step."""
    import torch

    from distml.errors import DistmlError
    from distml.export import load_model, metadata, save_model
    from distml.recipe import ModelRecipe

    recipe = ModelRecipe("resnet18", num_classes=3, input_shape=(3, 16, 16), normalize="fold")
    images = torch.rand(6, 3, 16, 16)
    assert recipe.check(images.numpy()) > 11_000_000  # one forward pass: (6, 3) logits
    model = recipe.for_fold(images, torch.arange(6)).eval()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (6, 3)
    info = metadata(
        "resnet18",
        model,
        image_size=32,
        classes=["a", "b", "c"],
        input_shape=[3, 16, 16],
        normalisation={"kind": "in-model"},
        num_classes=3,
        normalized_in_model=True,
    )
    save_model(tmp_path / "model", model, info)
    with torch.no_grad():
        again = load_model(tmp_path / "model").model(images)
    torch.testing.assert_close(again, logits)
    with pytest.raises(DistmlError, match="resnet18 needs images of 1 or 3 channels"):
        ModelRecipe("resnet18", num_classes=3, input_shape=(4,)).build()
