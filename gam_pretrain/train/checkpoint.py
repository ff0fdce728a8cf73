"""Atomic, fingerprinted, hashed checkpoints that every engine writes through one path.

    <run>/checkpoints/step_00001000/          a complete checkpoint (has COMPLETE)
        model_optim.pt | deepspeed/ | dcp/    the engine's state: single/DDP, DeepSpeed (which adds its
                                              zero_to_fp32.py and zero_to_torch.py), FSDP2
        rng_rank00000.pt ...                  each rank's RNG state
        trainer_state.json                    step, data position, loss history, fingerprints, schedule
        files.json                            the sha256 of every file above
        COMPLETE                              "step N" and the sha256 of files.json
    <run>/checkpoints/step_00001200.partial/  being written, or left by a crash: never loaded

All ranks write into the .partial directory (engine state, each rank's RNG; every rank its own
shard, fsynced); rank 0 adds trainer_state.json; every rank hashes its share of the files; rank 0
writes them into files.json, writes the COMPLETE marker, then renames the folder into place. With
checkpoint.async_save the writing, hashing and sealing run in a background thread after each rank
has snapshotted its state into memory (Checkpointer). Old checkpoints are pruned to the newest `keep_last` at or below the step just
saved, plus every multiple of `keep_every` and every step of `keep_steps`.

Before anything in a checkpoint is read, `verify_checkpoint` checks every file against files.json:
a missing, changed or extra file is refused in one line naming it. Checkpoints written before
files.json existed (COMPLETE holds only the step) are loaded unchecked. Nothing in a checkpoint can
run code: torch files are read with torch.load(weights_only=True) (plus, for DeepSpeed, an
allow-list of its plain data classes) and FSDP2's pickled DCP metadata with a restricted unpickler
(engines/fsdp2.py). The manifest detects damage, not forgery: whoever can write a checkpoint can
write its files.json.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from ..config import ADDED_SINCE_FIRST_RUNS
from ..models import read_fields_only
from ..files import first_line, sha256_file, write_atomic
from .distributed import DistInfo, barrier, decided_on_main

COMPLETE = "COMPLETE"
STATE = "trainer_state.json"
MANIFEST = "files.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A damaged checkpoint, or one holding something a checkpoint may not (code, foreign objects)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not belong to this run (other data, model, world size or schedule)."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where a run's complete checkpoint of `step` lives."""
    return checkpoint_root(run_dir) / f"step_{step:08d}"


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


# ---- reading files safely --------------------------------------------------------------------------
def _refused_global(error: pickle.UnpicklingError) -> str | None:
    """What torch's weights-only unpickler refused (the global or opcode its long message names);
    None when the pickle was merely damaged."""
    text = str(error)
    if not text.startswith("Weights only load failed"):
        return None
    match = re.search(r"(?:Unsupported|Trying to load unsupported) .*?(?= was not an allowed|\.\s|\.?$)", text,
                      re.MULTILINE)
    return match.group(0) if match else "not plain data"


def load_torch_file(path, map_location="cpu", allowed: list | tuple = (), label: str | None = None, **kwargs):
    """torch.load(weights_only=True): tensors and plain data only, plus the classes in `allowed`.
    A file holding anything else, or a damaged one, is refused in one line naming it (or `label`)."""
    name = label or path
    try:
        with torch.serialization.safe_globals(list(allowed)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's multi-line note on a pickle protocol it did not write
            return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name} is missing") from None
    except pickle.UnpicklingError as e:
        if refused := _refused_global(e):
            raise CheckpointError(f"{name} holds an object a checkpoint may not contain ({refused}); refused to "
                                  "load it: only tensors and plain data are read") from None
        raise CheckpointError(f"{name} is damaged or truncated ({first_line(e)})") from None
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # a damaged file fails in many ways (zip reader, struct, EOF, OS errors)
        raise CheckpointError(f"{name} cannot be read: damaged, truncated or not a torch file "
                              f"({type(e).__name__}: {first_line(e)})") from None


def _payload_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder (relative, '/'-separated) except the manifest and the marker."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() not in (MANIFEST, COMPLETE))


def _hash_files(folder: Path, names: list[str]) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=8) as pool:  # hashlib releases the GIL: several files at once
        return dict(zip(names, pool.map(lambda name: sha256_file(folder / name), names)))


# ---- saving -------------------------------------------------------------------------------------
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


def snapshot(tree):
    """A copy of a state tree's tensors in host memory, the containers around them rebuilt as they
    were (dict subclasses and their attributes kept, torch.Size and other tuples left alone); other
    leaves are shared. What an async save writes while training changes the originals. A DTensor
    (FSDP2) is cloned where it lives: DCP writes each shard with its device mesh (on GPUs that copy
    is in device memory)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone() if hasattr(tree, "placements") else tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        out = copy.copy(tree)
        for key, value in tree.items():
            out[key] = snapshot(value)
        return out
    if type(tree) in (list, tuple):
        return type(tree)(snapshot(value) for value in tree)
    return tree


def save_durably(obj, path: Path) -> None:
    """torch.save, then fsync: the bytes are on disk before the checkpoint is sealed."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Writes checkpoints (see the module docstring for the folder and the guarantees).

    With async_save, `save` blocks only while the engine snapshots this rank's state into memory
    (and DeepSpeed/DCP plan their files); a background thread then writes and fsyncs each rank's
    files, hashes them, and rank 0 seals the folder, renames it into place and prunes, with the
    collectives of that work on a gloo group of its own. The next save (and `wait`, `close`) first
    waits for the previous one; a save asked to block (the final one, a preemption's) returns when
    its checkpoint is complete. A process killed at any moment leaves at most a `.partial` folder.
    """

    def __init__(self, run_dir: Path, engine, dist: DistInfo, keep_last: int = 2, keep_every: int = 0,
                 async_save: bool = False, keep_steps: tuple[int, ...] = ()):
        self.run_dir, self.engine, self.dist = Path(run_dir), engine, dist
        self.keep_last, self.keep_every, self.keep_steps = keep_last, keep_every, tuple(keep_steps)
        self.group = tdist.new_group(backend="gloo") if async_save and tdist.is_initialized() else None
        device = getattr(engine, "device", None)
        on_gpu = device is not None and device.type == "cuda"
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint",
                                       initializer=(lambda: torch.cuda.set_device(device)) if on_gpu else None) \
            if async_save else None
        self.pending = None

    def save(self, step: int, trainer_state: dict, blocking: bool = False) -> Path:
        """Checkpoint `step` (collective); returns the folder it is (or will be) complete in."""
        self.wait()
        final = checkpoint_dir(self.run_dir, step)
        partial = final.with_name(final.name + ".partial")
        if self.dist.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        barrier()
        write_engine_files = self.engine.stage_save(partial)
        rng, state_json = _rng_state(), json.dumps(trainer_state, indent=1)

        def finish() -> None:
            error = None
            try:
                write_engine_files(self.group)
                save_durably(rng, partial / f"rng_rank{self.dist.rank:05d}.pt")
                if self.dist.is_main:
                    write_atomic(partial / STATE, state_json)
            except Exception as e:  # noqa: BLE001 - every rank must learn it, or the others wait forever
                error = e
            self._every_rank_succeeded(error, partial)  # every rank's files are on disk
            digests = _hash_across_ranks(partial, self.dist, self.group)
            error = None
            if self.dist.is_main:
                try:
                    seal(partial, step, digests)
                    _put_in_place(partial, final)
                    _fsync_dir(final.parent)
                    prune(self.run_dir, self.keep_last, self.keep_every, step, self.keep_steps)
                except Exception as e:  # noqa: BLE001
                    error = e
            self._every_rank_succeeded(error, partial)

        if self.pool is None or blocking:
            finish()
        else:
            self.pending = self.pool.submit(finish)
        return final

    def _every_rank_succeeded(self, error: Exception | None, partial: Path) -> None:
        """A collective on the checkpoint's group: raises the same one line on every rank when any
        rank failed (a rank left waiting at a barrier would hang until gloo's timeout)."""
        failed = error is not None
        if tdist.is_initialized():
            flag = torch.tensor([float(failed)])
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=self.group)
            failed = bool(flag.item())
        if failed:
            why = f"{type(error).__name__}: {first_line(error)}" if error is not None else "it failed on another rank"
            raise CheckpointError(f"checkpoint {partial} could not be written ({why}); it was left unfinished")

    def wait(self) -> None:
        """Until the save in flight (if any) is complete; raises what stopped it."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self.wait()
        if self.pool is not None:
            self.pool.shutdown()


def _put_in_place(partial: Path, final: Path) -> None:
    if final.exists():  # a step saved again (after a resume from an earlier one): swap, then delete
        replaced = final.with_name(final.name + ".replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
        os.replace(partial, final)
        shutil.rmtree(replaced)
    else:
        os.replace(partial, final)


def _hash_across_ranks(folder: Path, dist: DistInfo, group=None) -> dict[str, str]:
    """The sha256 of every file in `folder`, each rank hashing its share (largest files dealt out
    first), so sealing a sharded checkpoint costs what one rank's shards cost."""
    def largest_first():
        return sorted(_payload_files(folder), key=lambda name: -(folder / name).stat().st_size)

    names = decided_on_main(largest_first, dist, group)
    mine = _hash_files(folder, names[dist.rank::dist.world_size])
    if dist.world_size == 1:
        return mine
    shares = [None] * dist.world_size
    tdist.all_gather_object(shares, mine, group=group)
    return {name: digest for share in shares for name, digest in share.items()}


def seal(folder: Path, step: int, digests: dict[str, str] | None = None) -> None:
    """files.json (the sha256 of every file now in `folder`), then the COMPLETE marker naming its hash."""
    digests = digests if digests is not None else _hash_files(folder, _payload_files(folder))
    manifest = json.dumps({"sha256": dict(sorted(digests.items()))}, indent=1)
    write_atomic(folder / MANIFEST, manifest)
    write_atomic(folder / COMPLETE, f"step {step}\n{MANIFEST} {hashlib.sha256(manifest.encode()).hexdigest()}\n")


def prune(run_dir: Path, keep_last: int, keep_every: int, saved_step: int, keep_steps: tuple[int, ...] = ()) -> None:
    """Keep the newest `keep_last` checkpoints at or below `saved_step`, every multiple of keep_every
    and every step of keep_steps.

    Checkpoints beyond the step just saved are left alone: they are damaged ones that a resume
    skipped (or ones an explicit resume went back from), and counting them as the newest would
    delete the intact checkpoints this run depends on. The run replaces each when it saves that step.
    """
    found = [(step, path) for step, path in complete_checkpoints(run_dir) if step <= saved_step]
    newest = {step for step, _ in found[-max(keep_last, 1):]}
    for step, path in found:
        if step not in newest and step not in keep_steps and not (keep_every and step % keep_every == 0):
            shutil.rmtree(path)


# ---- verifying and loading -------------------------------------------------------------------------
def read_trainer_state(path: Path) -> dict:
    """trainer_state.json of a complete checkpoint (not checked against files.json: see verify_checkpoint)."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    state_file = path / STATE
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{state_file} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{state_file} is not valid JSON (truncated or garbled?): {e}") from None
    required = {"step": int, "loader": dict, "history": list, "train_seconds": (int, float), "model": dict,
                "engine": dict}
    for key, kind in required.items():
        if not isinstance(state, dict) or not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{state_file} has no valid '{key}' (garbled or not written by gam-pretrain)")
    return state


def _manifest_hash(path: Path) -> str | None:
    """The sha256 of files.json that COMPLETE records; None for a checkpoint written before manifests."""
    marker = path / COMPLETE
    lines = marker.read_text(errors="replace").splitlines()
    if not lines or not re.fullmatch(r"step \d+", lines[0]):
        raise CheckpointError(f"{marker} is garbled")
    if len(lines) == 1:
        return None
    parts = lines[1].split()
    if len(parts) != 2 or parts[0] != MANIFEST or not re.fullmatch(r"[0-9a-f]{64}", parts[1]):
        raise CheckpointError(f"{marker} is garbled")
    return parts[1]


def check_files(path: Path) -> bool:
    """Every file of the checkpoint against files.json; True if checked, False for a checkpoint
    from before manifests. Raises CheckpointError naming the first file at fault."""
    path = Path(path)
    expected_manifest_hash = _manifest_hash(path)
    if expected_manifest_hash is None:
        return False
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"{manifest_file} is missing")
    if sha256_file(manifest_file) != expected_manifest_hash:
        raise CheckpointError(f"{manifest_file} is damaged (its sha256 is not the one {path / COMPLETE} records)")
    try:
        listed = json.loads(manifest_file.read_text())["sha256"]
    except (ValueError, KeyError, TypeError):
        listed = None
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        raise CheckpointError(f"{manifest_file} is garbled")
    present = _payload_files(path)
    for name in sorted(listed):
        if name not in present:
            raise CheckpointError(f"{path / name} is missing (listed in {MANIFEST})")
    for name in present:
        if name not in listed:
            raise CheckpointError(f"{path / name} is not part of the checkpoint (not listed in {MANIFEST})")
    for name, digest in _hash_files(path, sorted(listed)).items():
        if digest != listed[name]:
            raise CheckpointError(f"{path / name} is damaged: its sha256 differs from the one in {MANIFEST}")
    return True


def verify_checkpoint(path: Path, log=None) -> dict:
    """Checks a checkpoint's files against its manifest, then returns its trainer state. Nothing in
    the checkpoint has been unpickled when this raises (CheckpointError, naming the file)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint {path}")
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    if not check_files(path) and log:
        log(f"{path} has no {MANIFEST} (written by an older gam-pretrain): its files are not checked for damage")
    return read_trainer_state(path)


def find_resume_checkpoint(run_dir: Path, resume: str, log=print) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its trainer state, or None to start from scratch.

    resume=auto tries the complete checkpoints newest first and takes the first intact one; each
    damaged one is skipped with one line naming the file at fault (and left on disk). If every one is
    damaged, it refuses rather than silently starting over. An explicit path must be intact.
    """
    if resume in ("never", ""):
        return None
    if resume != "auto":
        return Path(resume), verify_checkpoint(Path(resume), log)
    damaged = []
    for step, path in reversed(complete_checkpoints(run_dir)):
        try:
            return path, verify_checkpoint(path, log)
        except (CheckpointError, OSError) as e:
            log(f"skipping damaged checkpoint {path.name}: {e}")
            damaged.append((path.name, e))
    if damaged:
        names = ", ".join(name for name, _ in damaged)
        raise CheckpointError(f"no intact checkpoint in {checkpoint_root(run_dir)} (damaged: {names}; the newest: "
                              f"{damaged[0][1]}); move them away to start over, or set checkpoint.resume=never")
    return None


def _first_difference(key: str, old, new) -> tuple[str, object, object] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for sub in sorted(set(old) | set(new)):
            name = f"{key}.{sub}"
            if sub not in old and ADDED_SINCE_FIRST_RUNS.get(name, object()) == new.get(sub):  # an older checkpoint
                continue
            found = _first_difference(name, old.get(sub), new.get(sub))
            if found:
                return found
        return None
    return None if old == new else (key, old, new)


# keys added to trainer_state.json after checkpoints were first written: not checked when absent
_RECORDED_SINCE_MANIFESTS = ("total_steps", "optim")


def check_resumable(path: Path, state: dict, expect: dict) -> None:
    """Refuses a checkpoint this run must not continue from: one beyond its last step (resuming would
    save that state under an earlier step's name), or one written with other data, model, engine,
    global batch or schedule. `expect` holds this run's values of those trainer-state keys."""
    total = expect["total_steps"]
    if state["step"] > total:
        raise CheckpointMismatchError(
            f"checkpoint {path} is at step {state['step']}, beyond this run's last step {total} (train.max_steps / "
            "train.epochs); resuming would overwrite a later checkpoint with an earlier step's name. Use the same "
            "train.max_steps, or another train.run_name")
    if "global_batch" not in state and "batch_size" in state:  # in 0.1, train.batch_size was per process
        state = {**state, "global_batch": state["batch_size"] * state.get("world_size", 1)}
    if isinstance(expect.get("model"), dict) and isinstance(state.get("model"), dict):  # fields the family never reads
        arch = expect["model"].get("arch", "")
        state = {**state, "model": read_fields_only(state["model"], arch)}
        expect = {**expect, "model": read_fields_only(expect["model"], arch)}
    for key, value in expect.items():
        if key not in state and key in _RECORDED_SINCE_MANIFESTS:
            continue
        found = _first_difference(key, state.get(key), value)
        if found:
            name, old, new = found
            hint = {"total_steps": " (from train.max_steps / train.epochs)",
                    "global_batch": " (train.batch_size, the global batch over all ranks; in gam-pretrain 0.1 it "
                                    "was per process)"}.get(name, "")
            raise CheckpointMismatchError(
                f"checkpoint {path} was written with {name}={old!r}, this run has {name}={new!r}{hint}; resume "
                "with the same data, model, engine, global batch and schedule (the world size may change), or set "
                "checkpoint.resume=never")


def load_checkpoint(path: Path, engine, dist: DistInfo, state: dict, expect: dict) -> dict:
    """Restores engine state and this rank's RNG from a checkpoint already verified (on rank 0) and
    found resumable; returns its trainer state. At another world size the engine reshards the state
    and each rank's random streams (dropout) start afresh from (seed, step, rank)."""
    check_resumable(path, state, expect)
    engine.load(Path(path))
    if state.get("world_size", 1) == dist.world_size:
        _set_rng_state(load_torch_file(Path(path) / f"rng_rank{dist.rank:05d}.pt"))
    else:  # ranks are not the same processes any more: fresh streams, a function of (seed, step, rank)
        seed = int(np.random.SeedSequence([state["loader"]["seed"], state["step"], dist.rank]).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    return state
