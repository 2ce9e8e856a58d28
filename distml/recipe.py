"""What a training run trains: its dataset, its test set, and the recipe of its models.

A ModelRecipe is a plain, picklable value. The driver builds one model from it and runs one batch through it on the
CPU before Ray starts (a broken factory fails there, in one line); every trainer builds its folds' models from it,
each with the normalisation step of its own training part."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from distml.config import MODEL_NAMES, DataOptions, TrainSettings, parse_normalize
from distml.datasets import Dataset, check_compatible, load_data, mnist_datasets, parse_resize
from distml.errors import DistmlError

if TYPE_CHECKING:
    import torch
    from torch import nn

# Recipes are made in the driver, which schedules and must start fast: torch (seconds of imports) loads only in the
# methods that build models, which trainers call, and the driver only to check a user's model.

CHECK_BATCH = 4  # examples in the driver's one forward pass


@dataclass(frozen=True)
class ModelRecipe:
    model: str | Callable[..., nn.Module]  # a built-in name, an import string, or a callable
    num_classes: int
    input_shape: tuple[int, ...]
    model_kwargs: dict = field(default_factory=dict)
    normalize: str = "fold"  # "none" (the inputs are used as they are), "fold", or given "MEAN:STD"
    loss: Callable[[], Callable] | None = None  # a user's loss factory (None: cross-entropy)
    optimizer: Callable | None = None  # a user's optimizer factory, optimizer(params, lr) (None: Adam)

    @classmethod
    def for_data(
        cls, model, dataset: Dataset, model_kwargs: dict | None, normalize: str, loss=None, optimizer=None
    ) -> ModelRecipe:
        """ "auto" normalisation: none for data already normalised (MNIST's known constants), else per fold."""
        mode = ("none" if dataset.normalized else "fold") if normalize == "auto" else normalize
        shape = tuple(dataset.input_shape)
        return cls(model, dataset.num_classes, shape, dict(model_kwargs or {}), mode, loss, optimizer)

    @property
    def custom_training(self) -> bool:
        """A user's loss or optimizer: folds then train one at a time (the stacked path is Adam on
        cross-entropy)."""
        return self.loss is not None or self.optimizer is not None

    @property
    def builtin(self) -> bool:
        return isinstance(self.model, str) and self.model in MODEL_NAMES

    def build(self) -> nn.Module:
        """The plain network, without its normalisation step."""
        if self.model == "resnet18":  # built in, but above models.py: resnet.py builds on the training loop's types
            from distml.resnet import resnet18_classifier  # torch and torchvision: see above

            return resnet18_classifier(self.num_classes, self.input_shape, **self.model_kwargs)
        from distml.models import build_model  # torch: see above

        return build_model(self.model, self.num_classes, self.input_shape, self.model_kwargs)

    def normalization(
        self, inputs: torch.Tensor, train_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) per channel or feature for the fold whose training part is `train_index`; None without a
        normalisation step."""
        import torch  # see above

        from distml.models import normalization_stats

        if self.normalize == "none":
            return None
        if self.normalize == "fold":
            return normalization_stats(inputs, train_index)
        mean, std = parse_normalize(self.normalize)
        channels = self.input_shape[0]
        if len(mean) not in (1, channels):
            raise DistmlError(
                f"{len(mean)} values for {channels} {'channels' if len(self.input_shape) == 3 else 'features'}",
                option="--normalize",
            )
        expand = channels if len(mean) == 1 else 1
        return torch.tensor(mean * expand), torch.tensor(std * expand)

    def for_fold(self, inputs: torch.Tensor, train_index: torch.Tensor) -> nn.Module:
        """The fold's model: the network behind its normalisation step (saved inside it, so an exported model
        needs nothing else)."""
        from distml.models import with_normalization  # torch: see above

        model = self.build()
        stats = self.normalization(inputs, train_index)
        if stats is None:
            return model
        mean, std = (t.to(inputs.device) for t in stats)
        return with_normalization(model, mean, std, self.input_shape)

    def check(self, inputs) -> int:
        """Build one model and run one small batch of `inputs` (an array) through it on the CPU; a one-line DistmlError
        for a factory that fails, a result that is no nn.Module, or output that is not (N, num_classes). Returns the
        model's parameter count."""
        import torch  # see above

        from distml.models import check_model, count_parameters

        parse_normalize(self.normalize)
        example = torch.as_tensor(inputs[:CHECK_BATCH]).float()
        model = self.for_fold(example, torch.arange(len(example)))
        check_model(model, example, self.num_classes)
        return count_parameters(model)


@dataclass(frozen=True)
class Given:
    """What the Python API was handed as objects, where a config (and config.json) can only name them: the data,
    the test data, the model, loss and optimizer factories. None: the config's name stands."""

    data: object = None
    test_data: object = None
    model: Callable | None = None
    loss: Callable[[], Callable] | None = None
    optimizer: Callable | None = None
    groups: object = None  # a group label per example (K-fold)
    folds: object = None  # a fold index per example (K-fold)


@dataclass(frozen=True)
class Prepared:
    dataset: Dataset
    test: Dataset | None  # kept out of every fold; MNIST's own test images for MNIST
    recipe: ModelRecipe
    parameters: int | None  # the model's parameter count, when the driver built one to check it


def prepare(config: DataOptions | TrainSettings, given: Given = Given(), ignore: tuple[str, ...] = ()) -> Prepared:
    """Load and check what `config` names (or the objects the Python API was given instead), before Ray starts: a
    user's model is built once here and runs one batch on the CPU. `ignore`: CSV columns that are not features."""
    options = {"target": config.target, "x_key": config.x_key, "y_key": config.y_key, "data_dir": config.data_dir}
    resize = parse_resize(config.resize) if config.resize else None
    test_data = config.test_data if given.test_data is None else given.test_data
    if given.data is None and config.data == "mnist" and test_data is None:
        dataset, test = mnist_datasets(config.data_dir)  # MNIST brings its own test images
    else:
        dataset = load_data(config.data if given.data is None else given.data, resize=resize, ignore=ignore, **options)
        test = None
        if test_data is not None:
            test = load_data(
                test_data, resize=resize, classes=dataset.classes, option="--test-data", ignore=ignore, **options
            )
            check_compatible(dataset, test)
    model = config.model if given.model is None else given.model
    recipe = ModelRecipe.for_data(model, dataset, config.model_kwargs, config.normalize, given.loss, given.optimizer)
    parameters = None
    if not (recipe.builtin and dataset.source == "mnist"):  # the built-in networks are known to fit MNIST
        parameters = recipe.check(dataset.inputs)
    return Prepared(dataset, test, recipe, parameters)
