"""ResNet18 for MNIST: torchvision's network with a new 10-class head, its weights, and its input pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distml.errors import DistmlError

# torchvision's ImageNet normalisation, which the pretrained backbone expects
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 64


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


def build_resnet18(weights: str | Path | None = "imagenet", num_classes: int = 10) -> nn.Module:
    """resnet18 with `fc` replaced by a `num_classes` head.

    weights: "imagenet" (torchvision's), "none"/None (random), or a path to a state dict. A file saved from a
    1000-class ResNet18 loads all but its head; one saved from a distml model loads whole.
    """
    from torchvision.models import resnet18

    if weights == "imagenet":
        model = _imagenet_model()
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model
    model = resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    if weights is None or str(weights) == "none":
        return model
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
    return model


def check_image_size(image_size: int) -> None:
    # ResNet18 downsamples 32x; below 32 pixels its last stage sees less than one pixel
    if not 32 <= image_size <= 512:
        raise DistmlError(f"must be between 32 and 512 pixels, got {image_size}", option="--image-size")


def to_resnet_input(images: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 grayscale (N, 28, 28) -> float32 (N, 3, S, S): scaled, resized, repeated to 3 channels, normalised."""
    x = torch.as_tensor(images).float().div_(255.0).unsqueeze(1)
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def head_and_backbone(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The head's parameters and the backbone's, for separate learning rates (or a frozen backbone)."""
    head = list(model.fc.parameters())
    head_ids = {id(p) for p in head}
    return head, [p for p in model.parameters() if id(p) not in head_ids]


def backbone(model: nn.Module) -> nn.Module:
    """Everything before `fc`: maps (N, 3, S, S) images to (N, 512) features."""
    return nn.Sequential(*(m for name, m in model.named_children() if name != "fc"), nn.Flatten())
