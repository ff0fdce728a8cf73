"""Atomic, fingerprinted checkpoints that every engine writes through one path.

    <run>/checkpoints/step_00001000/          a complete checkpoint (has COMPLETE)
    <run>/checkpoints/step_00001200.partial/  being written, or left by a crash: never loaded

All ranks write into the .partial directory (engine state, each rank's RNG), rank 0 adds
trainer_state.json, then the COMPLETE marker, then renames it into place; old checkpoints are
pruned to the newest `keep_last` plus every multiple of `keep_every`. Loading uses
torch.load(weights_only=True) for our files, so a checkpoint cannot run code.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .distributed import DistInfo, barrier

COMPLETE = "COMPLETE"
STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not belong to this run (other data, model or world size)."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and (path / COMPLETE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))


def save_checkpoint(run_dir: Path, step: int, engine, trainer_state: dict, dist: DistInfo,
                    keep_last: int = 2, keep_every: int = 0) -> Path:
    final = checkpoint_root(run_dir) / f"step_{step:08d}"
    partial = final.with_name(final.name + ".partial")
    if dist.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    engine.save(partial)
    torch.save(_rng_state(), partial / f"rng_rank{dist.rank:05d}.pt")
    barrier()
    if dist.is_main:
        (partial / STATE).write_text(json.dumps(trainer_state, indent=1))
        with open(partial / COMPLETE, "w") as f:
            f.write(f"step {step}\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        prune(run_dir, keep_last, keep_every)
    barrier()
    return final


def prune(run_dir: Path, keep_last: int, keep_every: int) -> None:
    found = complete_checkpoints(run_dir)
    newest = {step for step, _ in found[-max(keep_last, 1):]}
    for step, path in found:
        if step not in newest and not (keep_every and step % keep_every == 0):
            shutil.rmtree(path)


def read_trainer_state(path: Path) -> dict:
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    return json.loads((path / STATE).read_text())


def load_checkpoint(path: Path, engine, dist: DistInfo, expect: dict) -> dict:
    """Restores engine state and this rank's RNG; returns the trainer state. `expect` holds the
    fingerprints the checkpoint must match (data, model, world size, engine)."""
    state = read_trainer_state(path)
    for key, value in expect.items():
        if state.get(key) != value:
            raise CheckpointMismatchError(
                f"checkpoint {path} was written with {key}={state.get(key)!r}, this run has {value!r}; "
                "resume with the same data, model, engine and world size, or set checkpoint.resume=never"
            )
    engine.load(Path(path))
    rng_file = Path(path) / f"rng_rank{dist.rank:05d}.pt"
    _set_rng_state(torch.load(rng_file, weights_only=True))
    return state
