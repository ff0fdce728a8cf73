"""PyTorch FSDP2: `fully_shard` on every block and the root; parameters, gradients and optimizer
state are sharded across ranks (DTensors). Checkpoints are torch.distributed.checkpoint (DCP)
folders: sharded on disk, loadable at another world size. `load_dcp` reads them without running
anything they contain: .metadata through a restricted unpickler, every value weights_only."""
from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ...config import RunConfig
from ...files import first_line
from ..checkpoint import CheckpointError, load_torch_file, snapshot
from ..distributed import DistInfo
from .base import Engine, is_on_meta, uses_bf16

DCP_DIR = "dcp"
DCP_METADATA = ".metadata"

# What DCP pickles into .metadata: its record dataclasses, tensor shapes, dtypes and layouts, and the
# path it was saved to. Each is built from plain values without running code.
_DCP_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _DCP_METADATA_GLOBALS and not is_dtype:
            raise _RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def read_dcp_metadata(path: Path):
    """A DCP folder's .metadata, unpickled with nothing but DCP's own records allowed."""
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except _RefusedGlobal as e:
        raise CheckpointError(f"{path} holds an object DCP metadata may not contain ({e}); refused to load it: "
                              "only DCP's own records are read") from None
    except Exception as e:  # a damaged pickle fails in many ways
        raise CheckpointError(f"{path} is damaged or truncated ({type(e).__name__}: {first_line(e)})") from None


class SafeDCPReader(FileSystemReader):
    """Reads .metadata (restricted, see read_dcp_metadata) before dcp.load starts, so a refused or
    damaged file ends in one line rather than in DCP's fallbacks and wrapped tracebacks."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.metadata = read_dcp_metadata(Path(path) / DCP_METADATA)

    def read_metadata(self, *args, **kwargs):
        if self.metadata.storage_meta is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP stores non-tensor values (the optimizer's hyper-parameters) as torch.save pickles, which
    the default planner reads with weights_only=False. This one reads each weights_only, then hands
    the default planner a pickle of the vetted value written here."""

    def __init__(self, reader: SafeDCPReader):
        super().__init__()
        self.reader = reader

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        where = Path(self.reader.path) / self.reader.storage_data[read_item.storage_index].relative_path
        vetted = load_torch_file(value, label=f"{where} (value of {read_item.dest_index.fqn})")
        clean = io.BytesIO()
        torch.save(vetted, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def load_dcp(state: dict, folder: Path, no_dist: bool = False) -> None:
    """dcp.load into `state`, safely (see SafeDCPReader, SafeLoadPlanner); failures in one line."""
    reader = SafeDCPReader(folder)
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(reader), no_dist=no_dist)
    except CheckpointException as e:  # DCP wraps each rank's exception with its traceback
        causes = [failure[0] if isinstance(failure, tuple) else failure for failure in e.failures.values()]
        for cause in causes:
            if isinstance(cause, (CheckpointError, OSError)):
                raise cause from None
        raise CheckpointError(f"{folder} could not be read ({first_line(causes[0]) if causes else e})") from None


class FSDP2Engine(Engine):
    def __init__(self, model: nn.Module, cfg: RunConfig, device: torch.device, dist: DistInfo):
        super().__init__(model, cfg, device, dist)
        kwargs = {}
        if uses_bf16(device, cfg.train.precision):
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if is_on_meta(self.module):  # deferred init: each block sharded as soon as it is initialised
            blocks = {id(block) for block in self.module.blocks}
            self.materialize_sharded(lambda name, unit: fully_shard(unit, **kwargs) if id(unit) in blocks else None)
        else:
            for block in self.module.blocks:
                fully_shard(block, **kwargs)
        fully_shard(self.module, **kwargs)
        self.model = self.module
        self.optimizer = self.build_optimizer()

    @staticmethod
    def defers_init(cfg: RunConfig) -> bool:
        return True

    def autocast(self):
        # in bf16 the policy already casts the parameters; autocast would only add casts
        return contextlib.nullcontext()

    def clip_gradients(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor across ranks

    def stage_save(self, directory: Path):
        # each rank's shards (DTensors) cloned; DCP writes every rank's own files and fsyncs them
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = snapshot({"model": model_sd, "optim": optim_sd})
        return lambda group: dcp.save(state, checkpoint_id=str(directory / DCP_DIR), process_group=group)

    def load(self, directory: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        load_dcp(state, directory / DCP_DIR)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.float() for k, v in sd.items()}
