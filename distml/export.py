"""Saving a trained model: its state dict, its metadata, and a TorchScript copy that loads without distml."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distml.atomic import write_atomic, write_json

STATE_FILE = "model.pt"
META_FILE = "model.json"
TORCHSCRIPT_FILE = "model.ts"


def save_model(model: nn.Module, meta: dict, folder: Path) -> dict[str, Path]:
    """Write model.pt (state dict), model.ts (TorchScript) and model.json (metadata) into `folder`, atomically.

    model.json is written last, so a folder with it holds a whole export.
    """
    folder = Path(folder)
    model = model.cpu().eval()
    scripted = torch.jit.script(model)  # fails here, before anything is written, if the model is not scriptable
    paths = {"state_dict": folder / STATE_FILE, "torchscript": folder / TORCHSCRIPT_FILE, "meta": folder / META_FILE}
    write_atomic(paths["state_dict"], lambda tmp: torch.save(model.state_dict(), tmp))
    write_atomic(paths["torchscript"], lambda tmp: torch.jit.save(scripted, str(tmp)))
    write_json(paths["meta"], {**meta, "files": {key: path.name for key, path in paths.items() if key != "meta"}})
    return paths
