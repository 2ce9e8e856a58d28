"""ResNet18 for MNIST: torchvision's network with a new 10-class head, its weights, its input pipeline, and the
plain-torch builders the fine-tune and the sweep train with (one of each: the head/backbone optimiser, the
backbone's features, the whole model from a trained head).

The model takes the same input as the MLP and CNN (MNIST-normalised (N, 1, 28, 28) tensors, see data.normalize)
and resizes, repeats and re-normalises each batch itself, so the dataset is never stored at ResNet's size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distml.config import DEFAULT_IMAGE_SIZE, FinetuneConfig, SweepConfig, check_image_size
from distml.data import MNIST_MEAN, MNIST_STD, NUM_CLASSES
from distml.errors import DistmlError
from distml.optim import Adam
from distml.train import TrainState, predict

FEATURES = 512  # ResNet18's feature width, the head's input

# torchvision's ImageNet normalisation, which the pretrained backbone expects
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _imagenet_model() -> nn.Module:
    """torchvision's ImageNet weights the standard way: its cache, else a download."""
    from torchvision.models import ResNet18_Weights, resnet18  # torchvision's import is slow: see build_resnet18

    weights = ResNet18_Weights.IMAGENET1K_V1
    try:
        return resnet18(weights=weights)
    except Exception as exc:  # offline, a proxy, a corrupt cached file
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise DistmlError(
            f"cannot load the ImageNet weights of ResNet18 ({type(exc).__name__}); put {Path(weights.url).name} "
            f"from {weights.url} at {cache}, or pass --weights PATH (a state dict) or --weights none",
            option="--weights",
        ) from None


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from an untrusted file: tensors only (weights_only=True), or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise DistmlError(f"{path} is not a file", option="--weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DistmlError(f"{path} is not a PyTorch weights file ({type(exc).__name__})", option="--weights") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DistmlError(f"{path} holds no state dict of tensors", option="--weights")
    return state


class MnistToResNet(nn.Module):
    """(N, 1, 28, 28) MNIST-normalised -> (N, 3, S, S) ImageNet-normalised, batch by batch."""

    def __init__(self, image_size: int = DEFAULT_IMAGE_SIZE):
        super().__init__()
        self.image_size = image_size
        # MNIST normalisation undone and ImageNet's applied, folded into one scale and shift per channel
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("scale", (MNIST_STD / std).view(1, 3, 1, 1))
        self.register_buffer("shift", ((MNIST_MEAN - mean) / std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x.expand(-1, 3, -1, -1) * self.scale + self.shift


class MnistResNet(nn.Module):
    """The input adapter followed by torchvision's resnet18 (`net`, whose `fc` is the head)."""

    def __init__(self, net: nn.Module, image_size: int = DEFAULT_IMAGE_SIZE):
        super().__init__()
        self.adapter = MnistToResNet(image_size)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.adapter(x))


def build_resnet18(
    weights: str | Path | None = "imagenet", num_classes: int = 10, image_size: int = DEFAULT_IMAGE_SIZE
) -> MnistResNet:
    """resnet18 with `fc` replaced by a `num_classes` head, behind the MNIST input adapter.

    weights: "imagenet" (torchvision's), "none"/None (random), or a path to a state dict. A file saved from a
    1000-class ResNet18 loads all but its head; one saved from a distml model loads whole.
    """
    from torchvision.models import resnet18  # torchvision's import is slow; only ResNet runs need it

    check_image_size(image_size)
    if weights == "imagenet":
        model = _imagenet_model()
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return MnistResNet(model, image_size)
    model = resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    if weights is None or str(weights) == "none":
        return MnistResNet(model, image_size)
    state = load_state_dict_file(Path(weights))
    expected = model.state_dict()
    if state.get("fc.weight") is not None and state["fc.weight"].shape != expected["fc.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # another head: keep the backbone
    missing = [k for k in expected if k not in state and not k.startswith("fc.")]
    wrong = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    unknown = [k for k in state if k not in expected]
    if missing or wrong or unknown:
        detail = (
            f"{len(missing)} missing (e.g. {missing[0]})"
            if missing
            else f"wrong shape for {wrong[0]}: {tuple(state[wrong[0]].shape)}"
            if wrong
            else f"unexpected key {unknown[0]}"
        )
        raise DistmlError(f"{weights} is not a ResNet18 state dict: {detail}", option="--weights")
    model.load_state_dict(state, strict=False)
    return MnistResNet(model, image_size)


def backbone(model: MnistResNet) -> nn.Module:
    """Everything before the head: maps (N, 1, 28, 28) MNIST-normalised images to (N, 512) features."""
    layers = [m for name, m in model.net.named_children() if name != "fc"]
    return nn.Sequential(model.adapter, *layers, nn.Flatten())


class HeadOnFrozenBackbone(nn.Module):
    """A trainable head on a backbone that stays in eval mode and gets no gradients (its features never change)."""

    def __init__(self, frozen: nn.Module, head: nn.Module):
        super().__init__()
        self.frozen = frozen.eval().requires_grad_(False)
        self.head = head

    def train(self, mode: bool = True) -> HeadOnFrozenBackbone:
        super().train(mode)
        self.frozen.eval()  # batch-norm statistics stay the pretrained ones
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.frozen(x)
        return self.head(features)


def resnet_from_state(initial_state: dict, image_size: int) -> MnistResNet:
    model = build_resnet18("none", NUM_CLASSES, image_size)
    model.load_state_dict(initial_state)
    return model


@torch.no_grad()
def backbone_features(initial_state: dict, image_size: int, images: torch.Tensor) -> torch.Tensor:
    """(N, 512) features of normalised (N, 1, 28, 28) images, from the backbone in eval mode."""
    frozen = backbone(resnet_from_state(initial_state, image_size)).to(images.device)
    return predict(frozen, images, batch_size=512)


def head_backbone_optimizer(model: nn.Module, head: nn.Module, lr: float, backbone_lr: float | None) -> Adam:
    """Adam with `backbone_lr` for `model`'s backbone (its group first) and `lr` for its head; None: the backbone is
    frozen (no gradients), and only the head trains."""
    head_params = list(head.parameters())
    head_ids = {id(p) for p in head_params}
    rest = [p for p in model.parameters() if id(p) not in head_ids]
    groups = [{"params": head_params, "lr": lr}]
    if backbone_lr is None:
        for parameter in rest:
            parameter.requires_grad_(False)
    elif rest:
        groups.insert(0, {"params": rest, "lr": backbone_lr})
    return Adam(groups, lr=lr)


def finetune_state(config: FinetuneConfig, weights: dict[str, torch.Tensor], device: torch.device) -> TrainState:
    """The fine-tune's network from the starting weights, and Adam with one rate for the head, one for the backbone.

    With a frozen backbone only the head has gradients; its batch-norm statistics still adapt to MNIST.
    """
    torch.manual_seed(config.seed)
    model = resnet_from_state(weights, config.image_size).to(device)
    optimizer = head_backbone_optimizer(
        model, model.net.fc, config.lr, None if config.freeze_backbone else config.backbone_lr
    )
    return TrainState(model, optimizer, torch.Generator().manual_seed(config.seed))


def sweep_state(config: SweepConfig, lr: float, initial_state: dict | None, device: torch.device) -> TrainState:
    """A sweep trial's model, optimizer and shuffling generator.

    Every trial starts from the same head and shuffles in the same order, so the learning rate is the only
    difference between them. With cached features the model is the head alone (the inputs are the features);
    with --uncached it is the head on the frozen backbone (batch-norm statistics fixed); with the backbone
    unfrozen, the whole ResNet18, its backbone at --backbone-lr.
    """
    torch.manual_seed(config.seed)
    head = nn.Linear(FEATURES, NUM_CLASSES)
    if config.cached_features:
        model: nn.Module = head
    elif config.freeze_backbone:
        model = HeadOnFrozenBackbone(backbone(resnet_from_state(initial_state, config.image_size)), head)
    else:
        model = resnet_from_state(initial_state, config.image_size)
        model.net.fc = head
    model = model.to(device)
    optimizer = head_backbone_optimizer(model, head, lr, None if config.freeze_backbone else config.backbone_lr)
    return TrainState(model, optimizer, torch.Generator().manual_seed(config.seed))


def full_model(config: SweepConfig, initial_state: dict, trained: nn.Module) -> MnistResNet:
    """The whole classifier (input adapter, backbone, head) from what a sweep trial trained."""
    if not config.freeze_backbone:
        return trained
    model = resnet_from_state(initial_state, config.image_size)
    model.net.fc = trained.head if isinstance(trained, HeadOnFrozenBackbone) else trained
    return model


def resnet18_classifier(
    num_classes: int = NUM_CLASSES,
    input_shape: tuple[int, ...] = (1, 28, 28),
    weights: str = "none",
    image_size: int | None = None,
) -> MnistResNet:
    """The built-in `--model resnet18` of kfold and train: torchvision's ResNet18 (random weights unless `weights`
    says "imagenet" or names a state dict) with a `num_classes` head, behind the input adapter, which resizes each
    batch to `image_size` (default: the images' side, at least 32) and repeats one channel to three."""
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise DistmlError(
            f"resnet18 needs images of 1 or 3 channels (C, H, W), got input shape {tuple(input_shape)}; use mlp "
            "for tabular data",
            option="--model",
        )
    return build_resnet18(weights, num_classes, image_size or max(32, *input_shape[1:]))
