"""Every engine x every family on 2 gloo processes (torchrun), fp32, tiny models: resume is exact;
engines agree with each other. SIGKILLs and damaged checkpoints: tests/test_torture.py."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SCENARIOS = Path(__file__).parent / "dist" / "scenarios.py"
# DeepSpeed is an extra (make test installs it); without it the ZeRO engines drop out of these tests
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ENGINES = {
    "ddp": ["engine.kind=ddp"],
    **({"zero1": ["engine.kind=deepspeed", "engine.zero_stage=1"],
        "zero2": ["engine.kind=deepspeed", "engine.zero_stage=2"],
        "zero3": ["engine.kind=deepspeed", "engine.zero_stage=3"]} if HAS_DEEPSPEED else {}),
    "fsdp2": ["engine.kind=fsdp2"],
}
FAMILIES = ["gam", "transformer", "mamba", "gam-assoc"]
N = 4  # steps before the save; the runs are 2N long


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(spec: dict, workdir: Path, name: str, ranks: int = 2) -> subprocess.Popen:
    spec_file = workdir / f"{name}.spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(SCENARIOS), str(spec_file)]
    return subprocess.Popen(cmd, env=env, stdout=open(workdir / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def run_to_end(spec: dict, workdir: Path, name: str, ranks: int = 2) -> dict:
    proc = torchrun(spec, workdir, name, ranks)
    if proc.wait(timeout=600) != 0:
        raise AssertionError(f"torchrun {name} failed:\n" + (workdir / f"{name}.log").read_text()[-4000:])
    return json.loads(Path(spec["out"]).read_text())


def overrides(data, out: Path, engine: str, arch: str, name: str, steps: int = 2 * N, extra=()) -> list[str]:
    return ["model.vocab_size=512", "model.block_size=32", "model.d_model=32", "model.n_layers=2",
            "model.memory_slots=16", "model.n_heads=4", "model.dropout=0.1", "model.expand=2", "model.d_state=4",
            f"data.dir={data.path}", "optim.lr=3e-3", "optim.warmup_steps=2", f"train.max_steps={steps}",
            "train.batch_size=4", "train.eval_batches=2", "train.eval_interval=0", "train.log_interval=2",
            f"train.out_dir={out}", "train.progress=false", "train.peak_flops=1e11", "logging.wandb=disabled",
            f"model.arch={arch}", f"train.run_name={name}", *ENGINES[engine], *extra]


_results: dict[str, dict] = {}


# The shared runs clip at a norm they never reach: the clipping code runs but leaves gradients alone.
# When clipping triggers, DeepSpeed computes the global norm in its own summation order and divides by
# (norm + 1e-6) / clip where torch multiplies by clip / (norm + 1e-6), so ZeRO curves then differ from
# DDP's in the last bits. The SIGKILL tests below keep the default clip of 1.0 (each engine vs itself).
UNREACHED_CLIP = ["optim.grad_clip=1000"]


# Elastic runs: the tiny corpus (an epoch of 8 global batches of 16), dropout 0, 2 x ELASTIC_N steps,
# a kept checkpoint at ELASTIC_N; resumed at the other world size from it.
ELASTIC_N = 6
ELASTIC_FAMILIES = ["gam", "transformer"]


def elastic_overrides(tiny, out: Path, engine: str, arch: str, name: str, resume_from: Path | None = None):
    extra = ["model.dropout=0", "train.batch_size=16", "train.eval_batches=0", "data.log_sample_ids=true",
             f"checkpoint.interval_steps={ELASTIC_N}", f"checkpoint.keep_every={ELASTIC_N}", *UNREACHED_CLIP]
    if resume_from:
        extra.append(f"checkpoint.resume={resume_from / 'checkpoints' / f'step_{ELASTIC_N:08d}'}")
    return overrides(tiny, out, engine, arch, name, steps=2 * ELASTIC_N, extra=[*extra, f"data.dir={tiny.path}"])


def engine_results(engine: str, data, tmp_root: Path, tiny) -> dict:
    """Launch A (2 ranks): per family, 2N steps straight, and N steps then stop with a checkpoint;
    elastic: 2 x ELASTIC_N steps at world 2. Launch A1 (1 rank): elastic at world 1, and resumed at
    world 1 from world 2's checkpoint. Launch B (2 ranks, a new process group): per family, resume
    and run to 2N; elastic: resumed at world 2 from world 1's checkpoint."""
    if engine not in _results:
        work = tmp_root / engine
        work.mkdir(parents=True, exist_ok=True)

        def elastic(arch, name, resume_from=None):
            return {"name": f"{name}-{arch}", "overrides": elastic_overrides(
                tiny, work, engine, arch, f"{name}-{arch}", work / f"{resume_from}-{arch}" if resume_from else None)}

        first = {"runs": [r for arch in FAMILIES for r in (
            {"name": f"straight-{arch}", "overrides": overrides(data, work, engine, arch, f"straight-{arch}",
                                                                extra=UNREACHED_CLIP)},
            {"name": f"cut-{arch}", "overrides": overrides(data, work, engine, arch, f"resumed-{arch}",
                                                           extra=[f"train.stop_at_step={N}", *UNREACHED_CLIP])})]
                 + [elastic(arch, "world2") for arch in ELASTIC_FAMILIES], "out": str(work / "a.json")}
        one_rank = {"runs": [r for arch in ELASTIC_FAMILIES for r in (
            elastic(arch, "world1"), elastic(arch, "from2to1", "world2"))], "out": str(work / "a1.json")}
        second = {"runs": [{"name": f"resumed-{arch}", "overrides": overrides(data, work, engine, arch, f"resumed-{arch}",
                                                                              extra=UNREACHED_CLIP)}
                           for arch in FAMILIES] + [elastic(arch, "from1to2", "world1") for arch in ELASTIC_FAMILIES],
                  "out": str(work / "b.json")}
        _results[engine] = {**run_to_end(first, work, "a"), **run_to_end(one_rank, work, "a1", ranks=1),
                            **run_to_end(second, work, "b")}
    return _results[engine]


def sample_ids(run_dir: Path) -> dict[int, list[int]]:
    """Each step's sample ids over all ranks (rank order), from data.log_sample_ids; a step logged
    twice (re-run after a resume) counts as its last line."""
    per_rank = []
    for path in sorted((run_dir / "sample_ids").glob("rank*.jsonl")):
        steps = {}
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps[record["step"]] = record["ids"]
        per_rank.append(steps)
    return {step: [i for steps in per_rank for i in steps[step]] for step in per_rank[0]}


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


@pytest.mark.parametrize("engine", list(ENGINES))
def test_save_new_launch_resume_is_exact(engine, prepared_small, prepared_tiny, tmp_root):
    results = engine_results(engine, prepared_small, tmp_root, prepared_tiny)
    for arch in FAMILIES:
        straight, resumed = results[f"straight-{arch}"], results[f"resumed-{arch}"]
        assert results[f"cut-{arch}"]["loss_curve"] == straight["loss_curve"][:N]
        assert resumed["loss_curve"] == straight["loss_curve"], arch
        assert resumed["params_checksum"] == straight["params_checksum"], arch
        assert resumed["val_loss"] == straight["val_loss"], arch


@pytest.mark.parametrize("engine", list(ENGINES))
def test_resume_at_another_world_size(engine, prepared_small, prepared_tiny, tmp_root):
    """2 -> 1 and 1 -> 2 ranks, from a checkpoint at step ELASTIC_N of 2 x ELASTIC_N (an epoch is 8
    steps, so the runs cross one): every global batch is the one the uninterrupted run trained on
    (sample ids logged by every rank), each sample once per epoch; with dropout 0 the first step
    after the resume has the uninterrupted run's loss (the same batch summed in another order), and
    the final validation loss is the uninterrupted run's at the new world size."""
    results = engine_results(engine, prepared_small, tmp_root, prepared_tiny)
    work = tmp_root / engine
    epoch = sum(s["samples"] for s in prepared_tiny.shards("train")) // 16
    assert ELASTIC_N < epoch < 2 * ELASTIC_N
    for arch in ELASTIC_FAMILIES:
        for source, resumed, same_world in (("world2", "from2to1", "world1"), ("world1", "from1to2", "world2")):
            before, after = sample_ids(work / f"{source}-{arch}"), sample_ids(work / f"{resumed}-{arch}")
            assert sorted(after) == list(range(ELASTIC_N + 1, 2 * ELASTIC_N + 1))  # it trained the steps after N
            combined = {**{s: ids for s, ids in before.items() if s <= ELASTIC_N}, **after}
            assert combined == sample_ids(work / f"{same_world}-{arch}") == before  # the seed's batches, at any world
            first_epoch = [i for step in range(1, epoch + 1) for i in combined[step]]
            assert len(first_epoch) == len(set(first_epoch)) == epoch * 16  # every sample of the epoch once
            second_epoch = [i for step in range(epoch + 1, 2 * ELASTIC_N + 1) for i in combined[step]]
            assert len(second_epoch) == len(set(second_epoch))
            got, want = results[f"{resumed}-{arch}"], results[f"{source}-{arch}"]
            assert got["loss_curve"][:ELASTIC_N] == want["loss_curve"][:ELASTIC_N]  # carried in the checkpoint
            assert got["loss_curve"][ELASTIC_N] == pytest.approx(want["loss_curve"][ELASTIC_N], rel=1e-5), (arch, resumed)
            np.testing.assert_allclose(got["loss_curve"], want["loss_curve"], rtol=1e-4)
            reference = results[f"{same_world}-{arch}"]["val_loss"]
            assert abs(got["val_loss"] - reference) < 0.005 * reference, (arch, resumed)


def test_engines_agree_with_each_other(prepared_small, prepared_tiny, tmp_root):
    curves = {e: engine_results(e, prepared_small, tmp_root, prepared_tiny) for e in ENGINES}
    for arch in FAMILIES:
        norms = [json.loads(line).get("grad_norm", 0.0) for line in
                 (tmp_root / "ddp" / f"straight-{arch}" / "metrics.jsonl").read_text().splitlines()]
        assert 0 < max(norms) < 1000, norms  # the clipping code ran and never scaled
        ddp = curves["ddp"][f"straight-{arch}"]["loss_curve"]
        for engine in ("zero1", "zero2", "fsdp2"):
            assert curves[engine][f"straight-{arch}"]["loss_curve"] == ddp, (engine, arch)
        np.testing.assert_allclose(curves["zero3"][f"straight-{arch}"]["loss_curve"], ddp, rtol=0, atol=1e-6)
    assert all(run["plain_linear_after"] for results in curves.values() for run in results.values())


def test_sharding_engines_hold_their_share_of_the_model_state(prepared_small, prepared_tiny, tmp_root):
    """Parameters + optimizer state per rank (the summary's model_state_bytes_per_rank), world 2:
    ZeRO-1/2 shard the Adam moments, ZeRO-3 and FSDP2 shard everything (about half of DDP's)."""
    state = {e: max(engine_results(e, prepared_small, tmp_root, prepared_tiny)["straight-gam"]["model_state_bytes_per_rank"])
             for e in ENGINES}
    assert state["zero1"] == state["zero2"] < 0.9 * state["ddp"]
    for engine in ("zero3", "fsdp2"):
        assert 0.45 * state["ddp"] < state[engine] < 0.55 * state["ddp"], (engine, state)


def test_exports_from_every_engine_hold_the_same_weights_and_eval_matches(prepared_small, prepared_tiny, tmp_root,
                                                                          tmp_path):
    import torch
    from safetensors.torch import load_file

    from gam_pretrain.cli import main

    weights = {}
    for engine in ENGINES:
        results = engine_results(engine, prepared_small, tmp_root, prepared_tiny)
        out = tmp_path / engine
        assert main(["export", str(tmp_root / engine / "straight-gam"), "--out", str(out)]) == 0
        weights[engine] = load_file(str(out / "model.safetensors"))
        assert (out / "tokenizer.json").is_file()
        # eval of the export equals the in-training validation loss (same 2 batches: eval_batches=2 -> full here)
        from gam_pretrain.data import ShardSet
        from gam_pretrain.eval.perplexity import evaluate
        from gam_pretrain.export import load_export
        import contextlib

        model, config, _ = load_export(out)
        assert config["step"] == 2 * N and config["engine"] == ENGINES[engine][0].split("=")[1]
        val = evaluate(model, ShardSet(prepared_small.path), "validation", 4, "cpu", contextlib.nullcontext, 2)
        assert abs(val["val_loss"] - results["straight-gam"]["val_loss"]) < 1e-5, engine
    for engine, w in weights.items():
        for name, tensor in w.items():
            torch.testing.assert_close(tensor, weights["ddp"][name], rtol=1e-5, atol=1e-6, msg=f"{engine} {name}")


def test_preemption_signal_to_one_rank_saves_on_all_and_exits_for_requeue(prepared_small, tmp_path):
    import psutil

    steps = 400
    extra = ["checkpoint.interval_steps=1000"]  # no periodic saves: only the preemption one
    spec = {"runs": [{"name": "r", "overrides": overrides(prepared_small, tmp_path, "ddp", "gam", "victim", steps,
                                                         extra)}], "out": str(tmp_path / "victim.json")}
    proc = torchrun(spec, tmp_path, "victim")
    metrics = tmp_path / "victim" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True) if "scenarios.py" in " ".join(c.cmdline())]
    assert len(ranks) == 2
    ranks[-1].send_signal(signal.SIGUSR1)  # one rank only: the other must learn it at the step boundary
    proc.wait(timeout=300)
    log = (tmp_path / "victim.log").read_text()
    # the first rank to exit with EXIT_REQUEUE makes torchrun SIGTERM the other, so count at least one
    assert proc.returncode != 0 and log.count("exitcode  : 3 (pid") >= 1
    saved = sorted((tmp_path / "victim" / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").is_file() and 6 <= int(saved[0].name[5:]) < steps
    assert len(list(saved[0].glob("rng_rank*.pt"))) == 2  # both ranks wrote their part
    reference = run_to_end({"runs": [{"name": "r", "overrides": overrides(prepared_small, tmp_path, "ddp", "gam",
                                                                           "reference", steps, extra)}],
                            "out": str(tmp_path / "ref.json")}, tmp_path, "ref")["r"]
    resumed = run_to_end(spec, tmp_path, "victim-resumed")["r"]
    assert resumed["params_checksum"] == reference["params_checksum"]


SHARDED = [e for e in ("fsdp2", "zero3") if e in ENGINES]


def init_spec(out: Path, runs: list[tuple[str, str, list[str]]]) -> dict:
    return {"runs": [{"name": name, "init_only": True, "overrides": ["data.dir=/unused", "train.seed=7", *ENGINES[engine],
                                                                      *extra]}
                     for name, engine, extra in runs], "out": str(out)}


def test_deferred_init_gives_the_single_process_weights_bit_for_bit(tmp_path):
    """FSDP2 and ZeRO-3 build the model on the meta device and materialize it one unit at a time,
    sharded; the gathered initial weights equal build_model's on one process, for every family,
    and the global random stream after init is the same too (dropout draws from it)."""
    import torch

    from gam_pretrain.config import load_config
    from gam_pretrain.train.loop import params_checksum

    tiny = ["model.vocab_size=512", "model.block_size=32", "model.d_model=64", "model.n_layers=3",
            "model.memory_slots=16", "model.n_heads=4", "model.expand=2", "model.d_state=4"]
    runs = [(f"{engine}-{arch}", engine, [*tiny, f"model.arch={arch}"]) for engine in SHARDED for arch in FAMILIES]
    results = run_to_end(init_spec(tmp_path / "init.json", runs), tmp_path, "init")
    for arch in FAMILIES:
        from gam_pretrain.models import build_model

        cfg = load_config(None, [*tiny, f"model.arch={arch}", "train.seed=7"])
        torch.manual_seed(7)
        build_model(cfg.model, seed=7)
        draw = float(torch.randn(()))
        expected = params_checksum(build_model(cfg.model, seed=7).state_dict())
        for engine in SHARDED:
            got = results[f"{engine}-{arch}"]
            assert got["params_checksum"] == expected, (engine, arch)
            assert got["after_init_draw"] == draw, (engine, arch)
            assert all(peak is not None for peak in got["materialize_rss_growth"])  # the deferred path ran


@pytest.mark.parametrize("engine", SHARDED)
def test_deferred_init_never_holds_the_whole_model(engine, tmp_path):
    """GAM with 109M parameters (435 MB in fp32) on 2 ranks: each rank's peak RSS grows, while the
    model is materialized, by its half of the parameters plus one unit at a time and allocator slack,
    never by the whole model (what building it whole first costs, before any sharding)."""
    big = ["model.arch=gam", "model.d_model=768", "model.n_layers=16"]
    result = run_to_end(init_spec(tmp_path / "init.json", [("big", engine, big)]), tmp_path, "init")["big"]
    full = result["param_bytes"]
    assert full > 400e6
    for growth in result["materialize_rss_growth"]:
        assert growth < 0.8 * full, (growth / full, result)


@pytest.mark.skipif("zero3" not in ENGINES, reason="needs DeepSpeed")
def test_zero3_resumes_at_three_ranks_whose_partitions_are_padded(prepared_tiny, tmp_path):
    """2 -> 3 ranks: the embedding (512 x 32) and most weights do not divide by 3, so ZeRO-3 pads the
    last rank's partition. The global batch (12) divides by both."""
    batch = ["train.batch_size=12"]
    first = {"runs": [{"name": "w2", "overrides": [*elastic_overrides(prepared_tiny, tmp_path, "zero3", "gam", "w2"),
                                                   *batch]}], "out": str(tmp_path / "w2.json")}
    second = {"runs": [{"name": "w3", "overrides": [*elastic_overrides(prepared_tiny, tmp_path, "zero3", "gam", "w3",
                                                                       tmp_path / "w2"), *batch]}],
              "out": str(tmp_path / "w3.json")}
    want = run_to_end(first, tmp_path, "w2")["w2"]
    got = run_to_end(second, tmp_path, "w3", ranks=3)["w3"]
    assert got["loss_curve"][ELASTIC_N] == pytest.approx(want["loss_curve"][ELASTIC_N], rel=1e-5)
    np.testing.assert_allclose(got["loss_curve"], want["loss_curve"], rtol=1e-4)
    assert sample_ids(tmp_path / "w3") == {s: ids for s, ids in sample_ids(tmp_path / "w2").items() if s > ELASTIC_N}


@pytest.mark.skipif("zero3" not in ENGINES, reason="needs DeepSpeed")
def test_zero3_with_activation_checkpointing_trains_as_without(prepared_small, tmp_path):
    """Backward recomputes a checkpointed block's forward: it must save what the forward saved
    (DeepSpeed's linear, swapped in around forward and backward alike)."""
    runs = {"runs": [{"name": name, "overrides": overrides(prepared_small, tmp_path, "zero3", "gam", name, steps=3,
                                                           extra=[*UNREACHED_CLIP, "model.dropout=0", *extra])}
                     for name, extra in (("plain", []), ("ac", ["engine.activation_checkpointing=true"]))],
            "out": str(tmp_path / "ac.json")}
    got = run_to_end(runs, tmp_path, "ac")
    np.testing.assert_allclose(got["ac"]["loss_curve"], got["plain"]["loss_curve"], rtol=0, atol=1e-6)
