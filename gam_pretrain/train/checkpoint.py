"""Atomic checkpoints: written to a temporary directory, marked complete, then renamed.

A directory without the COMPLETE marker is never loaded. Tensors are loaded with
torch.load(weights_only=True), so a checkpoint cannot run code.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

COMPLETE = "COMPLETE"


def save_checkpoint(directory: Path, engine_state: dict, meta: dict) -> Path:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(engine_state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    (tmp / COMPLETE).touch()
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def load_checkpoint(directory: Path) -> tuple[dict, dict]:
    directory = Path(directory)
    if not (directory / COMPLETE).is_file():
        raise FileNotFoundError(f"{directory} is not a complete checkpoint (no {COMPLETE} marker)")
    state = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
    meta = json.loads((directory / "meta.json").read_text())
    return state, meta
