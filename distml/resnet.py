"""ResNet18 for MNIST: torchvision's network with a new 10-class head, its weights, and its input pipeline.

The model takes the same input as the MLP and CNN (MNIST-normalised (N, 1, 28, 28) tensors, see data.normalize)
and resizes, repeats and re-normalises each batch itself, so the dataset is never stored at ResNet's size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distml.config import DEFAULT_IMAGE_SIZE
from distml.data import MNIST_MEAN, MNIST_STD
from distml.errors import DistmlError

# torchvision's ImageNet normalisation, which the pretrained backbone expects
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _imagenet_model() -> nn.Module:
    """torchvision's ImageNet weights the standard way: its cache, else a download."""
    from torchvision.models import ResNet18_Weights, resnet18

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
    from torchvision.models import resnet18

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


def check_image_size(image_size: int) -> None:
    # ResNet18 downsamples 32x; below 32 pixels its last stage sees less than one pixel
    if not 32 <= image_size <= 512:
        raise DistmlError(f"must be between 32 and 512 pixels, got {image_size}", option="--image-size")


def head_and_backbone(model: MnistResNet) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The head's parameters and the backbone's, for separate learning rates (or a frozen backbone)."""
    head = list(model.net.fc.parameters())
    head_ids = {id(p) for p in head}
    return head, [p for p in model.parameters() if id(p) not in head_ids]


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
