"""The standing bad-input suite: every mistake a user can make ends in exit status != 0 and ONE line
naming the thing at fault (file, key, shard, step), never a traceback, and changes nothing finished.

Each case is a command line against a world of finished things (a prepared data folder, a finished
run with checkpoints, an export, a sweep spec), optionally after `setup` damaged a copy of one. The
finished things are hashed before and after every case. Cases run in this process through the CLI's
`main` (a traceback would escape it and fail the case); `subprocess=True` cases go through
`python -m gam_pretrain` to hold the real entry point to the same rule.
"""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from gam_pretrain.cli import main
from gam_pretrain.train.checkpoint import seal

TINY = ["model.arch=gam", "model.vocab_size=512", "model.block_size=32", "model.d_model=32", "model.n_layers=2",
        "model.memory_slots=16", "model.dropout=0.0", "optim.lr=3e-3", "optim.warmup_steps=2", "train.batch_size=4",
        "train.eval_batches=2", "train.eval_interval=0", "train.log_interval=2", "train.progress=false",
        "logging.wandb=disabled", "checkpoint.interval_steps=2", "checkpoint.keep_last=5"]


@dataclass
class World:
    root: Path
    data: Path
    out: Path  # train.out_dir of the finished run
    run: Path
    export: Path
    spec: Path

    def train(self, *keys: str, data: Path | None = None, run_name: str = "done", steps: int = 4) -> list[str]:
        return ["train", *TINY, f"data.dir={data or self.data}", f"train.out_dir={self.out}",
                f"train.run_name={run_name}", f"train.max_steps={steps}", *keys]

    @property
    def checkpoints(self) -> list[Path]:
        return sorted((self.run / "checkpoints").glob("step_*"))


def tree_hashes(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(prepared_small, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad-inputs")
    data = root / "data"
    shutil.copytree(prepared_small.path, data)
    w = World(root, data, root / "runs", root / "runs" / "done", root / "export", root / "spec.yaml")
    assert main(w.train()) == 0
    assert main(["export", str(w.run), "--out", str(w.export)]) == 0
    w.spec.write_text(f"name: bad\nout_dir: {root / 'sweep'}\nrun:\n  model: {{vocab_size: 512, block_size: 32}}\n"
                      f"  data: {{dir: {data}}}\n  logging: {{wandb: disabled}}\n"
                      "families: [gam]\nwidths: [16]\ntokens: [2000]\n")
    return w


# ---- setups: each makes a damaged copy (never touches the world's finished things) ---------------
def copy_data(w: World, tmp: Path) -> Path:
    copy = tmp / "data"
    shutil.copytree(w.data, copy)
    return copy


def flip_token_bytes(path: Path, offset_from_end: int = 600, count: int = 64) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) - 1024 - offset_from_end, len(raw) - 1024 - offset_from_end + count):
        raw[i] ^= 0x01  # low bits of token ids: the tar stays a valid tar
    path.write_bytes(bytes(raw))


def corrupt_shard(w, tmp):
    data = copy_data(w, tmp)
    flip_token_bytes(data / "train-00000-000.tar")
    return {"data": data, "shard": data / "train-00000-000.tar"}


def out_of_vocab_shard(w, tmp):
    """A token id past the vocabulary, with the manifest's hash rewritten to match (a buggy tool)."""
    data = copy_data(w, tmp)
    shard = data / "train-00000-000.tar"
    raw = bytearray(shard.read_bytes())
    header = raw.index(b"\x93NUMPY")
    start = header + 10 + int.from_bytes(raw[header + 8: header + 10], "little")
    raw[start: start + 2] = (60000).to_bytes(2, "little")
    shard.write_bytes(bytes(raw))
    manifest = json.loads((data / "manifest.json").read_text())
    for entry in manifest["splits"]["train"]["shards"]:
        if entry["path"] == shard.name:
            entry["sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
    (data / "manifest.json").write_text(json.dumps(manifest))
    return {"data": data, "shard": shard}


def without_validation(w, tmp):
    data = copy_data(w, tmp)
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["splits"]["validation"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    return {"data": data}


def garbled_manifest(w, tmp):
    data = copy_data(w, tmp)
    (data / "manifest.json").write_text('{"format": "gam-pretrain-shards", "splits": {')
    return {"data": data}


def copy_run(w: World, tmp: Path) -> Path:
    out = tmp / "runs"
    shutil.copytree(w.run, out / "done")
    (out / "done" / "summary.json").unlink()
    return out


def truncated_newest_weights(w, tmp):
    out = copy_run(w, tmp)
    ckpt = sorted((out / "done" / "checkpoints").glob("step_*"))[-1]
    weights = ckpt / "model_optim.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    return {"out": out, "ckpt": ckpt, "file": weights}


def every_checkpoint_damaged(w, tmp):
    out = copy_run(w, tmp)
    for ckpt in (out / "done" / "checkpoints").glob("step_*"):
        (ckpt / "trainer_state.json").write_text("{")
    return {"out": out}


def crafted_pickle_checkpoint(w, tmp):
    """A checkpoint whose DeepSpeed state file is a pickle that would create a marker file."""
    import pickle

    ckpt = tmp / "evil" / "checkpoints" / "step_00000004"
    shutil.copytree(w.checkpoints[-1], ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["engine"]["kind"] = "deepspeed"
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    marker = tmp / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / "deepspeed").mkdir()
    (ckpt / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(Payload()))
    (ckpt / "latest").write_text("deepspeed")
    seal(ckpt, 4)  # a consistent file manifest: the unpickling itself must refuse
    return {"ckpt": ckpt, "file": ckpt / "deepspeed", "after": lambda: not marker.exists()}


def flipped_export(w, tmp):
    export = tmp / "export"
    shutil.copytree(w.export, export)
    weights = export / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    for i in range(len(raw) - 3000, len(raw) - 1000):
        raw[i] ^= 0xFF
    weights.write_bytes(bytes(raw))
    return {"export": export, "file": weights}


def export_without_tokenizer(w, tmp):
    export = tmp / "export"
    shutil.copytree(w.export, export)
    (export / "tokenizer.json").unlink()
    config = json.loads((export / "config.json").read_text())
    del config["sha256"]["tokenizer.json"]  # an export made without a tokenizer, not a damaged one
    (export / "config.json").write_text(json.dumps(config))
    return {"export": export}


def garbled_export_config(w, tmp):
    export = tmp / "export"
    shutil.copytree(w.export, export)
    (export / "config.json").write_text('{"model": ')
    return {"export": export, "file": export / "config.json"}


def export_with_command_as_data(w, tmp):
    """A shared export whose config.json names a pipe: command as its data: never run without --data."""
    export = tmp / "export"
    shutil.copytree(w.export, export)
    config = json.loads((export / "config.json").read_text())
    config["data_path"] = f"pipe:touch {tmp}/ran; cat {w.data}/{{file}}"
    (export / "config.json").write_text(json.dumps(config))
    return {"export": export, "file": export}


def write(name: str, text: str):
    def setup(w, tmp):
        path = tmp / name
        path.write_text(text)
        return {"file": path}
    return setup


def jsonl_corpus(lines: list[str]):
    def setup(w, tmp):
        (tmp / "train.jsonl").write_text("".join(line + "\n" for line in lines))
        (tmp / "validation.jsonl").write_text('{"text": "a short validation document"}\n')
        return {"file": tmp / "train.jsonl"}
    return setup


def parquet_corpus(w, tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["one document", "another"]}), tmp / "train.parquet")
    pq.write_table(pa.table({"body": ["validation"]}), tmp / "validation.parquet")
    return {"file": tmp / "train.parquet"}


def files_prep(tmp_name: str, suffix: str) -> list[str]:
    return ["prep", "--prep.source.kind", "files", "--prep.source.splits.train", f"{{tmp}}/{tmp_name}",
            "--prep.source.splits.validation", f"{{tmp}}/validation.{suffix}", "--prep.vocab_size", "300",
            "--prep.tokenizer", "bpe-bytelevel", "--out", "{tmp}/out", "--progress", "false"]


def run_lock_held(w, tmp):
    lock = open(w.run / ".lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return {"after": lambda: lock.close() or True}


def truncated_summary_in_sweep(w, tmp):
    from gam_pretrain.sweep.spec import expand, load_spec

    run = expand(load_spec(w.spec))[0]
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "summary.json").write_text('{"steps": 4, "val_')
    return {"file": run.run_dir / "summary.json", "after": lambda: shutil.rmtree(run.run_dir) or True}


def truncated_summary_for_fit(w, tmp):
    run = tmp / "sweep" / "runs" / "r0"
    run.mkdir(parents=True)
    (run / "sweep_run.json").write_text(json.dumps({"family": "gam", "width": 16}))
    (run / "summary.json").write_text('{"val_loss": 3.')
    return {"file": run / "summary.json"}


def evil_yaml(section: str, key: str):
    return write("evil.yaml", f'{section}:\n  {key}: "a\\nsrun rm -rf ~"\n')


@dataclass
class Case:
    id: str
    argv: list[str] | Callable[[World], list[str]]
    code: int
    names: str  # what the one line must name; {placeholders} from the world and the setup
    setup: Callable | None = None
    subprocess: bool = False


C = Case
CASES = [
    # ---- config --------------------------------------------------------------------------------
    C("unknown key", lambda w: w.train("train.max_stepz=3"), 2, "train.max_stepz"),
    C("wrong type", lambda w: w.train("train.max_steps=abc"), 2, "train.max_steps"),
    C("negative max_steps", lambda w: w.train(steps=-3), 2, "train.max_steps"),
    C("zero learning rate", lambda w: w.train("optim.lr=0"), 2, "optim.lr"),
    C("negative warm-up", lambda w: w.train("optim.warmup_steps=-1"), 2, "optim.warmup_steps"),
    C("negative eval interval", lambda w: w.train("train.eval_interval=-5"), 2, "train.eval_interval"),
    C("run name leaves out_dir", lambda w: w.train(run_name="../../escape"), 2, "train.run_name"),
    C("missing config file", ["train", "-c", "{tmp}/nope.yaml"], 2, "{tmp}/nope.yaml"),
    C("garbled YAML", ["train", "-c", "{file}"], 2, "{file}", write("bad.yaml", "train: [1, 2\n")),
    C("config is not a mapping", ["train", "-c", "{file}"], 2, "{file}", write("list.yaml", "- 1\n- 2\n")),
    C("unknown arch", lambda w: w.train("model.arch=gpt5"), 2, "model.arch"),
    C("unknown recipe", ["train", "data.recipe=nope"], 2, "data.recipe"),
    C("deepspeed_extra not an object", lambda w: w.train("engine.deepspeed_extra=[1]"), 2, "engine.deepspeed_extra"),
    C("batch not divisible", lambda w: w.train("train.grad_accum=3"), 2, "train.grad_accum"),
    C("dropout out of range", lambda w: w.train("model.dropout=1.5"), 2, "model.dropout"),
    C("newline in out_dir", ["train", "-c", "{file}"], 2, "train.out_dir", evil_yaml("train", "out_dir")),
    C("unknown key, real entry point", ["train", "--train.max-stepz", "3"], 2, "train.max_stepz", subprocess=True),
    # ---- prep ----------------------------------------------------------------------------------
    C("prep unknown recipe", ["prep", "nope", "--out", "{tmp}/out"], 2, "nope"),
    C("prep without --out", ["prep", "embedded"], 2, "out"),
    C("prep vocab 0", ["prep", "embedded", "--out", "{tmp}/out", "--prep.vocab_size", "0"], 1, "prep.vocab_size"),
    C("prep block 0", ["prep", "embedded", "--out", "{tmp}/out", "--prep.block_size", "0"], 1, "prep.block_size"),
    C("prep documents_per_unit -1", ["prep", "embedded", "--out", "{tmp}/out", "--prep.documents_per_unit", "-1"], 1,
      "prep.documents_per_unit"),
    C("prep glob matches nothing", ["prep", "--prep.source.kind", "files", "--prep.source.splits.train",
                                    "{tmp}/none/*.txt", "--out", "{tmp}/out"], 1, "{tmp}/none/*.txt"),
    C("prep malformed JSONL line", files_prep("train.jsonl", "jsonl"), 1, "{file}:2",
      jsonl_corpus(['{"text": "fine"}', '{"text": "broken', '{"text": "fine"}'])),
    C("prep non-string text", files_prep("train.jsonl", "jsonl"), 1, "{file}:2",
      jsonl_corpus(['{"text": "fine"}', '{"text": 5}'])),
    C("prep parquet without the text column", files_prep("train.parquet", "parquet"), 1, "{file}", parquet_corpus),
    C("prep garbled JSON file", files_prep("train.json", "json"), 1, "{file}", write("train.json", '[{"text": "a"')),
    C("prep over a finished prep with another config", lambda w: ["prep", "embedded", "--out", str(w.data),
                                                                  "--prep.vocab_size", "300"], 1, "{data}"),
    C("prep tokenizer file missing", ["prep", "embedded", "--out", "{tmp}/out", "--prep.tokenizer", "{tmp}/tok.json"],
      1, "{tmp}/tok.json"),
    C("prep newline in a value", ["prep", "-c", "{file}"], 2, "prep.source.path",
      write("prep.yaml", 'out: x\nprep:\n  source: {kind: hf, path: "a\\nb"}\n')),
    C("prep hub dataset without network", ["prep", "--prep.source.kind", "hf", "--prep.source.path",
                                           "nobody/no-such-dataset", "--out", "{tmp}/out"], 1, "nobody/no-such-dataset"),
    C("verify a corrupt shard", ["verify", "{data}"], 1, "train-00000-000.tar", corrupt_shard),
    C("verify without manifest", ["verify", "{tmp}"], 1, "{tmp}"),
    C("verify takes no keys", lambda w: ["verify", str(w.data), "--fast"], 2, "--fast"),
    # ---- train ---------------------------------------------------------------------------------
    C("train on a missing folder", lambda w: w.train(data=w.root / "nowhere"), 1, "nowhere"),
    C("vocabulary too small", lambda w: w.train("model.vocab_size=100"), 1, "model.vocab_size"),
    C("block size differs", lambda w: w.train("model.block_size=64"), 1, "model.block_size"),
    C("paper packing asked of a separators prep", lambda w: w.train("data.packing=paper"), 1, "data.packing"),
    C("train on a corrupt shard", lambda w: w.train(data=Path("{data}"), run_name="c"), 1, "{shard}", corrupt_shard),
    C("train on an out-of-vocab id", lambda w: w.train(data=Path("{data}"), run_name="v"), 1, "{shard}",
      out_of_vocab_shard),
    C("no validation split", lambda w: w.train(data=Path("{data}"), run_name="nv"), 1, "validation",
      without_validation),
    C("garbled manifest", lambda w: w.train(data=Path("{data}"), run_name="g"), 1, "manifest.json", garbled_manifest),
    C("ddp without a launcher", lambda w: w.train("engine.kind=ddp", run_name="ddp"), 1, "torchrun"),
    C("loss becomes NaN", lambda w: w.train("optim.lr=1e30", "optim.warmup_steps=0", run_name="nan", steps=20), 1,
      "step"),
    # ---- resume --------------------------------------------------------------------------------
    C("resume past max_steps", lambda w: w.train(steps=2), 1, "step_00000004"),
    C("resume with another lr", lambda w: w.train("optim.lr=1e-3"), 1, "optim.lr"),
    C("resume another model", lambda w: w.train("model.d_model=48"), 1, "model"),
    C("resume from a missing path", lambda w: w.train(f"checkpoint.resume={w.root}/gone"), 1, "gone"),
    C("resume explicitly from truncated weights", lambda w: [*w.train(), "train.out_dir={out}",
                                                             "checkpoint.resume={ckpt}"], 1, "{file}",
      truncated_newest_weights),
    C("auto-resume with every checkpoint damaged", lambda w: [*w.train(), "train.out_dir={out}"], 1,
      "trainer_state.json", every_checkpoint_damaged),
    C("two processes on one run dir", lambda w: w.train(), 1, "{run}", run_lock_held),
    # ---- export / eval / generate ----------------------------------------------------------------
    C("export a missing folder", ["export", "{tmp}/none", "--out", "{tmp}/e"], 1, "{tmp}/none"),
    C("export a crafted pickle", ["export", "{ckpt}", "--out", "{tmp}/e"], 1, "{file}", crafted_pickle_checkpoint),
    C("export truncated weights", ["export", "{ckpt}", "--out", "{tmp}/e"], 1, "{file}", truncated_newest_weights),
    C("export onto a file", lambda w: ["export", str(w.run), "--out", str(w.run / "summary.json")], 1, "summary.json"),
    C("eval flipped export", ["eval", "{export}"], 1, "{file}", flipped_export),
    C("eval missing export", ["eval", "{tmp}/none"], 1, "{tmp}/none"),
    C("eval batch size 0", lambda w: ["eval", str(w.export), "--batch-size", "0"], 2, "--batch-size"),
    C("eval unknown split", lambda w: ["eval", str(w.export), "--split", "test"], 1, "test"),
    C("eval garbled export config", ["eval", "{export}"], 1, "{file}", garbled_export_config),
    C("eval export naming a command as data", ["eval", "{export}"], 1, "pass the data with --data",
      export_with_command_as_data),
    C("generate negative top-k", lambda w: ["generate", str(w.export), "--top-k", "-3"], 1, "--top-k"),
    C("generate negative new tokens", lambda w: ["generate", str(w.export), "--max-new-tokens", "-1"], 2,
      "--max-new-tokens"),
    C("generate without a tokenizer", ["generate", "{export}"], 1, "tokenizer.json", export_without_tokenizer),
    C("generate not an int", lambda w: ["generate", str(w.export), "--top-k", "many"], 2, "--top-k"),
    # ---- launch --------------------------------------------------------------------------------
    C("launch newline in job_name", ["launch", "train", "--dry-run", "-c", "{file}"], 2, "launch.job_name",
      evil_yaml("launch", "job_name")),
    C("launch newline in partition", ["launch", "train", "--dry-run", "-c", "{file}"], 2, "launch.partition",
      evil_yaml("launch", "partition")),
    C("launch newline in run_name", ["launch", "train", "--dry-run", "-c", "{file}"], 2, "train.run_name",
      evil_yaml("train", "run_name")),
    C("launch bad sbatch arg", ["launch", "train", "--dry-run", "launch.sbatch_args=[exclusive]"], 2,
      "launch.sbatch_args"),
    C("launch local on 2 nodes", ["launch", "train", "--dry-run", "launch.cluster=local", "launch.nodes=2"], 2,
      "launch.nodes"),
    C("launch prep block size 0", ["launch", "prep", "embedded", "--out", "{tmp}/o", "--dry-run",
                                   "--prep.block_size", "0"], 1, "prep.block_size"),
    C("launch prep 0 array tasks", ["launch", "prep", "embedded", "--out", "{tmp}/o", "--dry-run",
                                    "--launch.array_tasks", "0"], 2, "launch.array_tasks"),
    C("launch prep newline in qos", ["launch", "prep", "-c", "{file}", "--dry-run"], 2, "launch.qos",
      write("lp.yaml", 'recipe: embedded\nout: o\nlaunch:\n  qos: "a\\nb"\n')),
    # ---- sweep / fit / status --------------------------------------------------------------------
    C("sweep newline in out_dir", ["sweep", "{file}", "--dry-run"], 2, "out_dir",
      write("spec.yaml", 'name: s\nout_dir: "x\\ntouch pwned #"\nfamilies: [gam]\nwidths: [16]\ntokens: [2000]\n')),
    C("deepspeed universal checkpoint loading", lambda w: w.train(
        'engine.deepspeed_extra={{"checkpoint": {{"load_universal": true}}}}'), 2, "load_universal"),
    C("sweep missing spec", ["sweep", "{tmp}/none.yaml"], 2, "{tmp}/none.yaml"),
    C("sweep unknown key", lambda w: ["sweep", str(w.spec), "widthz=[1]"], 2, "widthz"),
    C("sweep width its heads do not divide", lambda w: ["sweep", str(w.spec), "families=[gam-assoc]", "widths=[200]",
                                                       "--list"], 2, "width 200 does not divide into its 3 heads"),
    C("sweep run index out of range", lambda w: ["sweep", str(w.spec), "--run-index", "99"], 2, "--run-index"),
    C("sweep status with a truncated summary", lambda w: ["sweep", str(w.spec), "--status"], 1, "{file}",
      truncated_summary_in_sweep),
    C("fit with a truncated summary", ["fit", "{tmp}/sweep"], 1, "{file}", truncated_summary_for_fit),
    C("fit a folder without runs", ["fit", "{tmp}"], 2, "{tmp}"),
    C("fit keys without a spec", ["fit", "{tmp}", "widths=[1]"], 2, "widths=[1]"),
    C("status unknown flag", lambda w: ["status", str(w.run), "--fast"], 2, "--fast"),
    C("status of a missing run", ["status", "{tmp}/none"], 1, "{tmp}/none"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World, tmp_path, capsys):
    finished = [world.data, world.run, world.export]
    before = tree_hashes(*finished)
    found = {"tmp": str(tmp_path), "data": str(world.data), "run": str(world.run), "out": str(world.out),
             "export": str(world.export), "ckpt": str(world.checkpoints[-1])}
    after_check = None
    if case.setup:
        made = case.setup(world, tmp_path)
        after_check = made.pop("after", None)
        found.update({k: str(v) for k, v in made.items()})
    argv = case.argv(world) if callable(case.argv) else case.argv
    argv = [a.format(**found) if "{" in a else a for a in map(str, argv)]
    capsys.readouterr()
    if case.subprocess:
        proc = subprocess.run([sys.executable, "-m", "gam_pretrain", *argv], capture_output=True, text=True)
        code, err = proc.returncode, proc.stderr
    else:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own refusals
            code = e.code
        err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert code == case.code, f"exit {code}, expected {case.code}:\n{err}"
    assert lines and lines[-1].startswith("gam-pretrain"), err
    assert len([line for line in lines if line.startswith("gam-pretrain")]) == 1, err
    assert case.names.format(**found) in lines[-1], f"the message does not name {case.names.format(**found)!r}:\n{err}"
    if after_check:
        assert after_check(), "the bad input had an effect it must not have"
    assert tree_hashes(*finished) == before, "a finished data folder, run or export was changed"


def test_the_suite_is_big_enough():
    assert len(CASES) >= 50
    assert len({c.id for c in CASES}) == len(CASES)
