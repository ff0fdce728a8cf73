"""Scaling-law sweeps: ladders, spec expansion, a tiny end-to-end sweep (skip / resume), the fitter
on synthetic laws, and a sweep as a SLURM job array (template and launcher)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from gam_pretrain.models import build_model
from gam_pretrain.sweep.fit import FitError, Law, check_points, fit_law, isoflop_minimum
from gam_pretrain.sweep.ladder import ladder, rung_config
from gam_pretrain.sweep.spec import expand, load_spec
from gam_pretrain.train.checkpoint import complete_checkpoints

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def cli(*args, timeout=600, **kw):
    return subprocess.run([PY, "-m", "gam_pretrain", *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


def test_ladder_spans_1m_to_1b_with_the_written_rule():
    for family in ("gam", "transformer", "mamba", "gam-assoc"):
        rungs = ladder(family, [96, 128, 512, 2048])
        assert 1.0e6 <= rungs[0].params <= 2.0e6, (family, rungs[0].params)
        assert rungs[-1].params > 1.0e9
        assert [r.params for r in rungs] == sorted(r.params for r in rungs)
        for r in rungs:
            layers = max(2, r.width // 64)
            assert r.config.n_layers == (2 * layers if family == "mamba" else layers)
            if family in ("transformer", "gam-assoc"):
                assert r.config.n_heads == max(1, r.width // 64)
    small = rung_config("mamba", 64)
    built = build_model(small)  # the meta-device count equals a real model's
    measured = ladder("mamba", [64])[0]
    assert measured.params == built.num_parameters() and measured.flops_per_token == built.flops_per_token(256)
    gam, tf = ladder("gam", [512])[0], ladder("transformer", [512])[0]
    assert gam.flops_per_token != 6 * gam.params and tf.flops_per_token != 6 * tf.params


def write_spec(tmp_path: Path, name: str, **fields) -> Path:
    spec = {
        "name": name,
        "run": {"model": {"vocab_size": 512, "block_size": 32, "dropout": 0.0, "memory_slots": 16},
                "data": {"dir": fields.pop("data_dir")}, "optim": {"warmup_steps": 10},
                "train": {"batch_size": 8, "eval_batches": 4, "log_interval": 10}, "logging": {"wandb": "disabled"}},
        "families": ["gam", "transformer", "mamba"], "widths": [16, 24, 32], "tokens": [15000, 30000],
        "lr": {"rule": "scaled", "value": 3.0e-3, "base_width": 32}, "out_dir": str(tmp_path / name),
        "checkpoints_per_run": 4,
    }
    spec.update(fields)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_spec_expansion_is_content_addressed(tmp_path, prepared_small):
    path = write_spec(tmp_path, "s", data_dir=str(prepared_small.path))
    runs = expand(load_spec(path))
    assert len(runs) == 18 and len({r.run_dir for r in runs}) == 18
    assert [r.run_dir for r in expand(load_spec(path))] == [r.run_dir for r in runs]
    r = runs[1]
    assert r.config.train.max_steps == round(30000 / (8 * 32)) and r.config.optim.lr == pytest.approx(3e-3 * 32 / 16)
    changed = write_spec(tmp_path, "s", data_dir=str(prepared_small.path), seeds=[7])
    assert not {x.run_dir for x in expand(load_spec(changed))} & {x.run_dir for x in runs}
    iso = expand(load_spec(write_spec(tmp_path, "iso", data_dir=str(prepared_small.path), tokens=[], flops=[1e10])))
    for run in iso:  # isoFLOP: tokens = C / architecture-aware FLOPs per token
        assert run.describe()["tokens"] == pytest.approx(1e10 / run.rung.flops_per_token, rel=0.01, abs=256)
    bad = write_spec(tmp_path, "bad", data_dir=str(prepared_small.path), flops=[1e10])
    out = cli("sweep", bad, "--status")
    assert out.returncode == 2 and "exactly one of 'tokens'" in out.stderr


def test_tiny_sweep_end_to_end_skips_finished_and_resumes_killed_runs(tmp_path, prepared_small):
    spec = write_spec(tmp_path, "tiny", data_dir=str(prepared_small.path), tokens=[8000, 16000])
    runs = expand(load_spec(spec))
    victim = runs[13]  # mamba d16, the larger budget: killed once it has a checkpoint
    proc = subprocess.Popen([PY, "-m", "gam_pretrain", "sweep", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 900  # 13 runs before the victim: about 60 s alone, many times that on a loaded machine
    while time.time() < deadline and proc.poll() is None:
        if complete_checkpoints(victim.run_dir):  # not a glob: step_*/COMPLETE also matches step_N.partial/
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before the run could be killed"
    assert not (victim.run_dir / "summary.json").exists() and (runs[0].run_dir / "summary.json").exists()

    out = cli("sweep", spec)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "13 done, 5 to train" in out.stdout, out.stdout
    starts = [json.loads(x) for x in (victim.run_dir / "attempts.jsonl").read_text().splitlines()]
    starts = [s for s in starts if s["event"] == "start"]
    assert len(starts) == 2 and starts[1]["start_step"] > 0 and starts[1]["resumed_from"]
    first = [json.loads(x) for x in (runs[0].run_dir / "attempts.jsonl").read_text().splitlines()]
    assert [e["event"] for e in first] == ["start", "finished"], "a finished run was trained again"

    before = {r.run_dir: (r.run_dir / "attempts.jsonl").read_text() for r in runs}
    again = cli("sweep", spec)
    assert again.returncode == 0 and "18 done, 0 to train" in again.stdout
    assert before == {r.run_dir: (r.run_dir / "attempts.jsonl").read_text() for r in runs}
    status = cli("sweep", spec, "--status")
    assert "18 done, 0 partial, 0 pending" in status.stdout

    fit = cli("fit", spec, "--bootstrap", "10")
    assert fit.returncode == 0, fit.stderr
    result = json.loads((tmp_path / "tiny" / "fit" / "fit.json").read_text())
    assert set(result["families"]) == {"gam", "transformer", "mamba"}
    for family, entry in result["families"].items():
        assert len(entry["points"]) == 6 and ("law" in entry or "error" in entry)
    assert len(result["comparison"]) == 7 and "best family per compute budget" in fit.stdout
    assert sorted((m["width"], m["budget"]) for m in result["measured"]) == sorted(
        (w, float(t)) for w in (16, 24, 32) for t in (8000, 16000))
    assert all(set(m["loss"]) == {"gam", "transformer", "mamba"} for m in result["measured"])
    assert "measured: lowest validation loss per budget and width" in fit.stdout
    for name in ("loss_vs_compute.png", "isoflop.png", "frontier.png"):
        png = tmp_path / "tiny" / "fit" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


CHINCHILLA = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def synthetic(law: Law, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    N = np.repeat(np.logspace(6, 9, 6), 6)
    D = np.tile(np.logspace(8, 11, 6), 6)
    return N, D, law.loss(N, D) * np.exp(rng.normal(0.0, noise, N.size))


def test_fitter_recovers_a_known_law_from_noisy_points():
    """36 points (6 sizes x 6 token counts) of Chinchilla's law with 1% multiplicative noise.
    Tolerances: alpha and beta within 0.03, E within 5%, the loss surface within 1% everywhere on
    the grid; the 95% bootstrap intervals of alpha and beta contain the true values."""
    N, D, L = synthetic(CHINCHILLA, 0.01)
    result = fit_law(N, D, L, bootstrap=30)
    law = result["law"]
    assert abs(law.alpha - 0.34) < 0.03 and abs(law.beta - 0.28) < 0.03
    assert abs(law.E - 1.69) / 1.69 < 0.05
    assert np.max(np.abs(law.loss(N, D) / CHINCHILLA.loss(N, D) - 1)) < 0.01
    for key, true in (("alpha", 0.34), ("beta", 0.28)):
        low, high = result["intervals"][key]
        assert low <= true <= high, (key, low, high)
    exact = fit_law(*synthetic(CHINCHILLA, 0.0), bootstrap=0)["law"]  # no noise: near exact
    assert abs(exact.alpha - 0.34) < 0.005 and abs(exact.beta - 0.28) < 0.005


def test_fitter_refuses_too_few_points(tmp_path):
    N, D, L = synthetic(CHINCHILLA, 0.0)
    with pytest.raises(FitError, match="5 points"):
        check_points(N[:5], D[:5], L[:5])
    with pytest.raises(FitError, match="distinct model sizes"):
        check_points(np.full(10, 1e6), D[:10], L[:10])
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    out = cli("fit", tmp_path / "empty")
    assert out.returncode == 2 and "no finished runs" in out.stderr


def test_the_report_flags_an_estimate_outside_its_interval_and_marks_extrapolation(monkeypatch):
    """The fit's text names every compute-optimal row beyond the largest run as extrapolated, and a
    parameter whose full-data estimate lies outside its percentile interval as a warning."""
    from gam_pretrain.sweep import report

    N, D, L = synthetic(CHINCHILLA, 0.01)
    points = [{"family": "gam", "width": int(n), "budget_kind": "tokens", "budget": float(d), "N": float(n),
               "D": float(d), "C": 6 * float(n) * float(d), "flops_per_token": 6 * float(n), "loss": float(loss),
               "seeds": 1} for n, d, loss in zip(N, D, L)]
    intervals = {k: [getattr(CHINCHILLA, k) * 0.9, getattr(CHINCHILLA, k) * 1.1] for k in ("E", "A", "B", "beta")}
    intervals["alpha"] = [CHINCHILLA.alpha + 0.1, CHINCHILLA.alpha + 0.2]  # the estimate below its interval
    monkeypatch.setattr(report, "fit_law", lambda *a, **k: {"law": CHINCHILLA, "intervals": intervals,
                                                           "bootstrap_laws": [CHINCHILLA] * 5,
                                                           "rms_log_residual": 0.0, "points": len(points)})
    result = report.fit_sweep(points, bootstrap=5)
    text = report.format_report(result)
    assert "fitted alpha outside the bootstrap interval (percentile method" in text
    rows = [line for line in text.splitlines() if line.strip() and line.strip()[0].isdigit()]
    assert sum(row.endswith("extrapolated") for row in rows) == sum(r["extrapolated"] for r in result["comparison"]) > 0


def test_the_report_compares_families_where_they_were_measured_with_the_seeds_spread():
    from gam_pretrain.sweep.report import compare_measured, format_report

    def point(family, width, budget, losses):
        return {"family": family, "width": width, "budget_kind": "tokens", "budget": budget, "loss": float(np.mean(losses)),
                "seeds": len(losses), "loss_std": float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0,
                "loss_min": min(losses), "loss_max": max(losses)}

    points = [point("gam", 32, 1e5, [3.0, 3.1, 3.2]), point("gam-assoc", 32, 1e5, [2.7, 2.8, 2.9]),  # apart
              point("gam", 64, 1e5, [3.0, 3.1, 3.2]), point("gam-assoc", 64, 1e5, [2.9, 3.0, 3.05]),  # overlapping
              point("gam", 32, 3e5, [3.0]), point("gam-assoc", 32, 3e5, [2.0]),  # one seed
              point("gam", 128, 3e5, [2.5, 2.6])]  # one family only
    rows = compare_measured(points)
    assert [(r["width"], r["budget"], r["best"], r["separated"]) for r in rows] == [
        (32, 1e5, "gam-assoc", True), (64, 1e5, "gam-assoc", False), (32, 3e5, "gam-assoc", False)]
    assert rows[0]["loss"]["gam"] == {"loss": pytest.approx(3.1), "loss_std": pytest.approx(0.1), "loss_min": 3.0,
                                      "loss_max": 3.2, "seeds": 3}
    text = format_report({"families": {}, "measured": rows, "comparison": []})
    assert "width 32    best: gam-assoc    separated         gam-assoc 2.800 [2.700, 2.900], gam 3.100 [3.000, 3.200]" in text
    assert text.count("within the spread") == 2


def test_isoflop_minimum_of_a_parabola():
    N = np.logspace(6, 8, 5)
    L = 2.0 + 0.1 * (np.log(N) - np.log(3e7)) ** 2
    m = isoflop_minimum(N, L)
    assert m["N"] == pytest.approx(3e7, rel=1e-6) and m["inside_range"] and m["loss"] == pytest.approx(2.0)
    assert isoflop_minimum(N[:2], L[:2]) is None


@pytest.mark.slurm
def test_sweep_as_slurm_job_array_template_then_launcher(slurm_cluster, tmp_path, prepared_small):
    spec = write_spec(tmp_path, "arr", data_dir=str(prepared_small.path), families=["gam"], widths=[16, 24],
                      tokens=[10000])
    out = subprocess.run(["sbatch", "--wait", "--array=0-1", "-o", str(tmp_path / "arr-%A_%a.out"),
                          str(REPO / "slurm" / "sweep_array.sbatch"), str(spec)],
                         env=dict(os.environ, GAM_PYTHON=PY), capture_output=True, text=True, timeout=300)
    logs = "".join(p.read_text()[-2000:] for p in tmp_path.glob("arr-*.out"))
    assert out.returncode == 0, out.stderr + logs
    runs = expand(load_spec(spec))
    assert all((r.run_dir / "summary.json").is_file() for r in runs)

    grown = write_spec(tmp_path, "arr", data_dir=str(prepared_small.path), families=["gam"], widths=[16, 24, 32],
                       tokens=[10000])
    out = cli("sweep", grown, "--slurm", "--wait", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 done, 1 submitted as a job array" in out.stdout and "3 done, 0 partial" in out.stdout
    again = cli("sweep", grown, "--slurm")
    assert again.returncode == 0 and "3 done, 0 submitted" in again.stdout


def test_a_cooldown_sweep_trains_each_stable_phase_once_and_fits_every_budget(tmp_path, prepared_small):
    """cooldowns: per width one wsd run at the largest budget; the smaller budgets branch from its
    checkpoints where their own decay starts, train only their decay, and each end is a fit point."""
    from gam_pretrain.sweep.report import collect

    spec = write_spec(tmp_path, "wsd", data_dir=str(prepared_small.path), families=["gam"], widths=[16, 24],
                      tokens=[6000, 12000, 18000], cooldowns=True)
    runs = expand(load_spec(spec))
    assert [r.branch_of is None for r in runs] == [False, False, True] * 2
    for stable_index in (2, 5):
        stable = runs[stable_index]
        branches = [r for r in runs if r.branch_of == stable_index]
        assert stable.config.optim.schedule == "wsd" and stable.config.checkpoint.keep_steps == \
            sorted(r.branch_step for r in branches)
        for branch in branches:
            assert branch.config.optim.schedule == "wsd" and branch.config.optim.warmup_steps == \
                stable.config.optim.warmup_steps
            assert branch.config.train.cooldown_from == str(stable.run_dir / "checkpoints" /
                                                            f"step_{branch.branch_step:08d}")
            assert branch.describe()["trained_steps"] == branch.config.train.max_steps - branch.branch_step
    # the branch point is by content: the same spec written elsewhere names the same runs
    elsewhere = load_spec(spec)
    elsewhere.out_dir = str(tmp_path / "moved")
    assert [r.config.train.run_name for r in expand(elsewhere)] == [r.config.train.run_name for r in runs]

    out = cli("sweep", spec, "--parallel", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    progress = [line for line in out.stdout.splitlines() if " done: " in line and ", val loss " in line]
    assert len(progress) == len(runs)  # a line per finished run, with its steps, loss and time
    for run in runs:
        summary = json.loads((run.run_dir / "summary.json").read_text())
        assert summary["steps"] == run.config.train.max_steps
        assert summary.get("branch_step", 0) == run.branch_step
        if run.branch_of is not None:  # the stable phase is the stable run's, step for step
            stable = json.loads((runs[run.branch_of].run_dir / "summary.json").read_text())
            assert summary["loss_curve"][:run.branch_step] == stable["loss_curve"][:run.branch_step]
    trained = sum(r.describe()["trained_steps"] for r in runs)
    assert trained < sum(r.config.train.max_steps for r in runs)
    points = collect(tmp_path / "wsd")
    assert sorted((p["width"], p["D"]) for p in points) == sorted((r.width, r.describe()["tokens"]) for r in runs)
