"""`gam-pretrain` command line: parse, build a config, call one function."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from .config import (
    ConfigError, LaunchPrepCommand, PrepCommand, RunConfig, apply_overrides, format_key_table, load_config,
    load_prep_command, parse_overrides, read_value, resolved_yaml, set_value, validate,
)
from .data.prep import PrepError
from .data.recipes import recipe_names
from .launch.submit import LaunchError
from .models.common import HEADED_ARCHS, ModelConfig
from .paper import DATASETS, MODEL_SLUGS, RECIPES, SCALES, TABLES
from .sweep.ladder import FAMILIES
from .sweep.spec import SweepSpec
from .train.summary import SUMMARY

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _default_config(name: str) -> Path | None:
    path = REPO_CONFIGS / name
    return path if path.is_file() else None


def train_in_this_process(cfg) -> None:
    """Train one run as a launched process would: early signals caught under SLURM, the preemption
    exit status kept, interpreter teardown skipped after a distributed run."""
    import torch.distributed as dist

    from .train.loop import train
    from .train.preemption import catch_early_signals

    if "SLURM_JOB_ID" in os.environ:
        catch_early_signals()
    code = 0
    try:
        train(cfg)
    except SystemExit as e:  # preemption: checkpoint written, exit status for the launcher
        code = e.code if isinstance(e.code, int) else 1
    finally:
        distributed = dist.is_initialized()
        if distributed:
            dist.destroy_process_group()
    if distributed or code:
        # Skip interpreter teardown after a distributed run: DeepSpeed/gloo background threads can
        # abort the process there after everything is saved, turning a finished run into a failure.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_config(args, overrides, default: Path | None = None):
    """The RunConfig of a command: its --config (or `default`), then the overrides, validated."""
    return validate(load_config(args.config or default, overrides))


def print_config_and_exit(args, cfg) -> bool:
    if args.print_config:
        print(resolved_yaml(cfg), end="")
    return args.print_config


def cmd_train(args, overrides):
    cfg = run_config(args, overrides)
    if args.cooldown_from:  # a path as given, not read as a YAML value
        cfg.train.cooldown_from = args.cooldown_from
        validate(cfg)
    if not print_config_and_exit(args, cfg):
        train_in_this_process(cfg)


def cmd_quickstart(args, overrides):
    from .quickstart import run_quickstart

    cfg = run_config(args, overrides, _default_config("quickstart.yaml"))
    if not print_config_and_exit(args, cfg):
        run_quickstart(cfg)


def model_config(overrides: list[str]) -> ModelConfig:
    """`models` and `ladder` take model keys, with or without the `model.` prefix."""
    base = ModelConfig()
    for key, value in parse_overrides(overrides):
        set_value(base, key.removeprefix("model."), read_value(value), source="command line")
    return base


def cmd_models(args, overrides):
    from .models import build_model, variant_configs

    base = model_config(overrides)
    rows = []
    for label, cfg in variant_configs(base):
        model = build_model(cfg, materialize=False)  # counted on the meta device
        rows.append({"model": label, "params": model.num_parameters(), "train_flops_per_token": model.flops_per_token(),
                     "forward_flops_breakdown": model.forward_flops_breakdown()})
    if args.json:
        print(json.dumps({"config": base.__dict__, "models": rows}, indent=2))
        return
    print(f"vocab {base.vocab_size}, block {base.block_size}, width {base.d_model}, {base.n_layers} layers, "
          f"{base.memory_slots} slots, kernel {base.conv_kernel}, {base.n_heads} heads, mamba expand {base.expand}")
    print(f"{'model':34s} {'params':>14s} {'train GFLOPs/token':>20s}")
    for r in rows:
        print(f"{r['model']:34s} {r['params']:>14,d} {r['train_flops_per_token'] / 1e9:>20.4f}")


def with_leading_recipe(overrides: list[str]) -> list[str]:
    """`prep RECIPE --key value ...`: a first bare word is the recipe."""
    if overrides and not overrides[0].startswith("-") and "=" not in overrides[0]:
        return ["--recipe", overrides[0], *overrides[1:]]
    return overrides


def cmd_prep(args, overrides):
    from .data.prep import finalize_prep, plan_prep, run_prep, run_units

    cmd = load_prep_command(PrepCommand, args.config, with_leading_recipe(overrides))
    if print_config_and_exit(args, cmd):
        return
    if cmd.phase == "all":
        run_prep(cmd.prep, cmd.out, workers=cmd.workers, progress=cmd.progress)
    elif cmd.phase == "plan":
        plan_prep(cmd.prep, cmd.out)
    elif cmd.phase == "units":
        n = run_units(cmd.out, cmd.task_index, cmd.task_count, workers=cmd.workers, progress=cmd.progress)
        print(f"task {cmd.task_index} of {cmd.task_count}: {n} units done")
    else:
        finalize_prep(cmd.out)


def cmd_launch_train(args, overrides):
    from .launch import launch_train

    cfg = run_config(args, overrides)
    if print_config_and_exit(args, cfg):
        return
    job = launch_train(cfg, dry_run=args.dry_run)
    if job is not None and args.wait:
        print(json.dumps(job.results()))


def cmd_launch_prep(args, overrides):
    from .launch import launch_prep

    cmd = load_prep_command(LaunchPrepCommand, args.config, with_leading_recipe(overrides))
    if print_config_and_exit(args, cmd):
        return
    jobs = launch_prep(cmd.prep, cmd.out, cmd.launch, dry_run=args.dry_run)
    if jobs is not None and args.wait:
        print(json.dumps(jobs[-1].result()))


def cmd_status(args, overrides):
    from .launch import format_status, run_status

    status = run_status(args.run_dir)
    print(json.dumps(status, indent=1) if args.json else format_status(status))


def _sweep(spec_path, overrides):
    from .sweep.spec import check_spec, expand, load_spec

    spec = check_spec(apply_overrides(load_spec(spec_path), overrides))
    return spec, expand(spec)


def cmd_sweep(args, overrides):
    from .sweep.runner import format_status, run_local, run_slurm, write_records, write_run_record

    spec, runs = _sweep(args.spec, overrides)
    if print_config_and_exit(args, spec):
        return
    if args.list:
        for run in runs:
            print(f"{run.index}\t{run.config.train.run_name}")
        from .sweep.runner import phases

        script = ["slurm/sweep_array.sbatch", args.spec, *overrides]
        stable, branches = (phases(runs) + [[]])[:2]
        if not branches:
            print(f"# {len(runs)} runs: {shlex.join(['sbatch', f'--array=0-{len(runs) - 1}', *script])}", file=sys.stderr)
            return
        first = shlex.join(["sbatch", "--parsable", f"--array={','.join(str(r.index) for r in stable)}", *script])
        second = shlex.join(["sbatch", "--kill-on-invalid-dep=yes", f"--array={','.join(str(r.index) for r in branches)}",
                             *script])
        print(f"# {len(runs)} runs, the cooldown branches after the runs they branch from: JOB=$({first}) && "
              f"{second.replace('sbatch ', 'sbatch --dependency=afterok:$JOB ', 1)}", file=sys.stderr)
        return
    if args.status:
        print(format_status(spec, runs))
        return
    if args.run_index is not None:
        if not 0 <= args.run_index < len(runs):
            raise ConfigError(f"--run-index {args.run_index} is outside 0..{len(runs) - 1}")
        run = runs[args.run_index]
        write_run_record(run)
        if (run.run_dir / SUMMARY).is_file():
            print(f"{run.config.train.run_name}: done already")
            return
        train_in_this_process(run.config)
        return
    if not args.dry_run:
        write_records(spec, runs)
    if args.slurm or args.dry_run:
        jobs = run_slurm(spec, runs, dry_run=args.dry_run)
        if args.wait and jobs:
            for job in jobs:
                job.results()
            print(format_status(spec, runs))
    else:
        run_local(spec, runs, parallel=args.parallel)
        print(format_status(spec, runs))


def cmd_fit(args, overrides):
    from .sweep.fit import FitError
    from .sweep.report import collect, fit_sweep, format_report, write_outputs

    target = Path(args.sweep)
    if target.is_file():
        spec, _ = _sweep(target, overrides)
        sweep_dir = Path(spec.out_dir)
    elif overrides:
        raise ConfigError(f"spec keys ({' '.join(overrides)}) need a sweep spec file, not the folder {target}")
    else:
        sweep_dir = target
    try:
        result = fit_sweep(collect(sweep_dir, params=args.params), bootstrap=args.bootstrap)
    except FitError as e:
        raise ConfigError(f"{sweep_dir}: {e}") from None
    print(format_report(result))
    for path in write_outputs(result, args.out or sweep_dir / "fit"):
        print(f"wrote {path}")


def cmd_ladder(args, overrides):
    from .sweep.ladder import WIDTHS, ladder

    base = model_config(overrides)
    widths = [int(w) for w in args.widths.split(",")] if args.widths else WIDTHS
    rows = []
    for family in ([args.family] if args.family else list(FAMILIES)):
        for rung in ladder(family, widths, base):
            rows.append({"family": family, "width": rung.width, "n_layers": rung.config.n_layers,
                         "n_heads": rung.config.n_heads if family in HEADED_ARCHS else None,
                         "params": rung.params, "non_embedding_params": rung.non_embedding_params,
                         "train_flops_per_token": rung.flops_per_token,
                         "flops_per_token_over_6N": rung.flops_per_token / (6 * rung.params)})
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"vocab {base.vocab_size}, block {base.block_size}; FLOPs per token from each family's own matmuls")
    print(f"{'family':12s} {'width':>5s} {'layers':>6s} {'heads':>5s} {'params':>15s} {'non-embedding':>15s} "
          f"{'train GFLOPs/tok':>16s} {'/ 6N':>6s}")
    for r in rows:
        print(f"{r['family']:12s} {r['width']:>5d} {r['n_layers']:>6d} {r['n_heads'] or '-':>5} {r['params']:>15,d} "
              f"{r['non_embedding_params']:>15,d} {r['train_flops_per_token'] / 1e9:>16.4f} {r['flops_per_token_over_6N']:>6.2f}")


def cmd_paper(args, overrides):
    from .paper import prep_table_data, run_table

    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.prep_only:
        for folder in prep_table_data(args.table, args.scale, args.recipe, overrides, args.dataset):
            print(folder)
        return
    run_table(args.table, args.scale, recipe=args.recipe, seeds=args.seeds, out_dir=args.out, overrides=overrides,
              datasets=args.dataset, models=args.model)


def cmd_verify(args, overrides):
    from .data.prep import verify

    verify(args.dir)


def cmd_inspect(args, overrides):
    from .data.inspect import inspect_shards

    inspect_shards(args.dir, samples=args.samples, max_shards=args.max_shards)


def cmd_export(args, overrides):
    from .export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {out}")


def cmd_eval(args, overrides):
    import contextlib

    from .data import ShardSet
    from .data.cache import check_fits
    from .eval.perplexity import evaluate
    from .data.remote import is_remote
    from .export import load_export

    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    model, config, _ = load_export(args.export)
    recorded = config.get("data_path") or ""
    if not args.data and is_remote(str(recorded)):  # an export is shared: a command in it must not run
        raise ValueError(f"{args.export}: its data_path is a URL or command ({str(recorded)[:80]}); "
                         "pass the data with --data")
    if recorded and not args.data and not Path(recorded).is_absolute():  # exports record it relative to themselves
        recorded = str(Path(args.export) / recorded)
        if not Path(recorded).is_dir():
            raise FileNotFoundError(f"{args.export}: the data it was trained on is not at {recorded} (relative to the "
                                    "export, as recorded): pass the data with --data")
    data = ShardSet(args.data or recorded)
    check_fits(data, model.cfg.vocab_size, model.cfg.block_size)
    result = evaluate(model, data, args.split, args.batch_size, "cpu", contextlib.nullcontext)
    print(json.dumps(result))


def cmd_generate(args, overrides):
    from .eval.generate import generate
    from .export import load_export

    for flag, value, least in (("--max-new-tokens", args.max_new_tokens, 1), ("--temperature", args.temperature, 0)):
        if not value >= least:
            raise ConfigError(f"{flag} must be at least {least}, got {value}")
    model, _, tokenizer = load_export(args.export)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.export} has no tokenizer.json")
    ids = generate(model, tokenizer.encode(args.prompt).ids, args.max_new_tokens, model.cfg.block_size,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print(args.prompt + tokenizer.decode(ids))


def cmd_evaluate(args, overrides):
    from .export import load_export
    from .files import first_line, write_atomic

    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1),
                               ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be at least {least}, got {value}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device}: no CUDA device here")
    if args.include_path and not Path(args.include_path).is_dir():
        raise FileNotFoundError(f"--include-path {args.include_path}: no such folder of task YAMLs")
    try:
        from .eval.harness import evaluate_tasks, task_manager
    except ImportError as e:
        raise ValueError(f"gam-pretrain evaluate needs lm-evaluation-harness ({first_line(e)}): "
                          "pip install 'gam-pretrain[eval]'") from None
    tasks = [t for t in args.tasks.split(",") if t]
    manager = task_manager(tasks, args.include_path)  # before the model loads: a wrong name costs nothing
    model, _, tokenizer = load_export(args.export)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.export} has no tokenizer.json")
    results = evaluate_tasks(model, tokenizer, tasks, manager, batch_size=args.batch_size, device=args.device,
                             limit=args.limit, num_fewshot=args.num_fewshot)
    table = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
             for task, metrics in results["results"].items()}
    print(json.dumps(table, indent=2))
    if args.out:
        write_atomic(args.out, json.dumps({"export": args.export, "tasks": tasks, "results": table,
                                           "n_samples": results.get("n-samples"),
                                           "versions": results.get("versions")}, indent=2, default=str))


KEYS_HELP = "config keys (--key VALUE, --key=VALUE or key=VALUE; values are read as YAML; - and _ alike):"


def config_parser(sub, name: str, schema: Any, help: str, config_help: str, description: str = ""):
    """A subcommand over a config dataclass: --config FILE, --print-config, and every key in --help."""
    p = sub.add_parser(name, help=help, description=description or help, allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"{KEYS_HELP}\n{format_key_table(schema)}")
    p.add_argument("--config", "-c", help=config_help)
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gam-pretrain")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gam-pretrain", allow_abbrev=False,
        description="Pretrain GAM and its Transformer/Mamba baselines. Every command that takes a config "
                    "reads --config FILE, then dotted overrides (--section.key VALUE or section.key=VALUE); "
                    "`gam-pretrain COMMAND --help` lists its keys.",
    )
    parser.add_argument("--version", action="version", version=f"gam-pretrain {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run_file = "YAML config (default: the dataclass defaults = the paper's setting)"
    p = config_parser(sub, "train", RunConfig(), "train one model from a YAML config plus overrides", run_file)
    p.add_argument("--cooldown-from", metavar="CHECKPOINT",
                   help="train.cooldown_from: a new run that branches from a wsd run's stable-phase checkpoint "
                        "(RUN/checkpoints/step_N) and decays to train.max_steps")
    p.set_defaults(func=cmd_train)
    p = config_parser(sub, "quickstart", RunConfig(), "GAM vs Transformer vs Mamba on the embedded corpus, "
                      "with a results table", "YAML config (default: configs/quickstart.yaml)")
    p.set_defaults(func=cmd_quickstart)
    p = config_parser(sub, "prep", PrepCommand(), "tokenize a corpus into WebDataset shards + manifest.json (resumable)",
                      "YAML with the keys below", description=(
                          "gam-pretrain prep RECIPE --out DIR [--key VALUE ...]\n\n"
                          f"RECIPE (the first word, or --recipe): {', '.join(recipe_names())}; it sets prep.*, which "
                          "the keys below override.\nA corpus of your own: --prep.source.kind files "
                          "--prep.source.splits.train 'corpus/train/*.txt' --prep.source.splits.validation ..."))
    p.set_defaults(func=cmd_prep)
    p = sub.add_parser("launch", help="submit training or data prep to SLURM with submitit (--launch.* keys)")
    launch_sub = p.add_subparsers(dest="what", required=True)
    lp = config_parser(launch_sub, "train", RunConfig(), "a training run as a SLURM job (one task per rank)",
                       "YAML config (may hold a launch: section)")
    lp.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    lp.add_argument("--wait", action="store_true", help="wait for the job and print each rank's result as JSON")
    lp.set_defaults(func=cmd_launch_train)
    lp = config_parser(launch_sub, "prep", LaunchPrepCommand(), "data prep as SLURM jobs: plan -> array of unit "
                       "tasks -> finalize", "YAML with the keys below",
                       description="gam-pretrain launch prep RECIPE --out DIR [--launch.array_tasks N] [--key VALUE ...]")
    lp.add_argument("--dry-run", action="store_true", help="print the three sbatch scripts; submit nothing")
    lp.add_argument("--wait", action="store_true", help="wait for the finalize job and print its split counts")
    lp.set_defaults(func=cmd_launch_prep)
    p = sub.add_parser("status", help="job state, step, tokens, checkpoint, speed, ETA and requeues of a run")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status, takes_keys=False)
    p = sub.add_parser("ladder", help="model-size ladders: per family and width, the layers, heads, parameters and FLOPs")
    p.add_argument("--family", choices=list(FAMILIES))
    p.add_argument("--widths", help="comma-separated widths (default: the whole ladder)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ladder)
    p = sub.add_parser("sweep", help="run a sweep spec: locally, or as a SLURM job array (--slurm); finished runs "
                       "are skipped", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"{KEYS_HELP}\n{format_key_table(SweepSpec())}")
    p.add_argument("spec", help="sweep YAML (see configs/sweeps/); the keys below override it")
    p.add_argument("--print-config", action="store_true", help="print the resolved spec as YAML and exit")
    p.add_argument("--parallel", type=int, default=1, help="local runs at a time")
    p.add_argument("--slurm", action="store_true", help="submit the unfinished runs as one job array (run.launch.* settings)")
    p.add_argument("--dry-run", action="store_true", help="print the job array's sbatch script; submit nothing")
    p.add_argument("--wait", action="store_true", help="with --slurm: wait for the array, then print the status")
    p.add_argument("--status", action="store_true", help="print each run's state and result, run nothing")
    p.add_argument("--list", action="store_true", help="print the runs with their indices, run nothing")
    p.add_argument("--run-index", type=int, help="train only run I (what slurm/sweep_array.sbatch calls per array task)")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("fit", help="fit L(N, D) per family from a sweep's finished runs; JSON + PNG plots")
    p.add_argument("sweep", help="a sweep spec YAML or its output directory")
    p.add_argument("--out", help="output directory (default: <sweep dir>/fit)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the intervals")
    p.add_argument("--params", choices=["non_embedding", "total"], default="non_embedding",
                   help="N = non-embedding (default, as Kaplan et al.) or all parameters")
    p.set_defaults(func=cmd_fit)
    p = sub.add_parser("paper", help="re-run the paper's Table 1 or 3 and write Markdown + JSON with its numbers beside ours")
    p.add_argument("table", choices=list(TABLES), help="Table 2 is tools/bench_scaling.py")
    p.add_argument("--scale", choices=SCALES, default="cpu",
                   help="full = the paper's setting (needs the datasets); gpu = that on the linux_doc stand-in; cpu = reduced "
                        "(stand-in); smoke = CI")
    p.add_argument("--recipe", choices=RECIPES, default="paper",
                   help="paper = the paper's models trained as its code does; fair = fair baselines, GPT-2 style recipe")
    p.add_argument("--seeds", type=int, default=3, help="train every row with seeds 1..N (mean and spread)")
    p.add_argument("--dataset", action="append", choices=DATASETS, help="only these rows (full scale)")
    p.add_argument("--model", action="append", choices=MODEL_SLUGS, help="only these rows")
    p.add_argument("--prep-only", action="store_true", help="prep the rows' data (when missing), print its folders, stop")
    p.add_argument("--out", help="output folder, shared by both tables (default runs/paper/<scale>-<recipe>)")
    p.set_defaults(func=cmd_paper)
    p = sub.add_parser("verify", help="re-hash a shard directory against its manifest and print stats")
    p.add_argument("dir")
    p.set_defaults(func=cmd_verify, takes_keys=False)
    p = sub.add_parser("inspect", help="a shard directory's summary, a few decoded samples, token ids by occurrences")
    p.add_argument("dir")
    p.add_argument("--samples", type=int, default=2, help="samples to decode per split")
    p.add_argument("--max-shards", type=int, default=4, help="shards read per split for the token counts")
    p.set_defaults(func=cmd_inspect, takes_keys=False)
    p = sub.add_parser("export", help="a checkpoint (any engine) -> model.safetensors + config.json + tokenizer")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export, takes_keys=False)
    p = sub.add_parser("eval", help="validation loss / perplexity of an export")
    p.add_argument("export")
    p.add_argument("--data", help="shard folder (default: the one it was trained on)")
    p.add_argument("--split", default="validation")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_eval, takes_keys=False)
    p = sub.add_parser("evaluate", help="lm-evaluation-harness tasks on an export (needs the eval extra)")
    p.add_argument("export")
    p.add_argument("--tasks", required=True, help="comma-separated lm_eval task names")
    p.add_argument("--include-path", help="a folder of task YAMLs (e.g. over local jsonl files) to add")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, help="at most this many documents per task")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--out", help="also write the metrics as JSON here")
    p.set_defaults(func=cmd_evaluate, takes_keys=False)
    p = sub.add_parser("generate", help="sample text from an export")
    p.add_argument("export")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate, takes_keys=False)
    p = sub.add_parser("models", help="list registered models with parameter counts and FLOPs per token")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        if overrides and not getattr(args, "takes_keys", True):
            raise ConfigError(f"gam-pretrain {args.command} takes no config keys; unknown arguments: "
                              f"{' '.join(overrides)} (see gam-pretrain {args.command} --help)")
        args.func(args, overrides)
    except ConfigError as e:
        print(f"gam-pretrain: config error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, FloatingPointError, PrepError, LaunchError) as e:
        # one line: every message names the file, key, shard or step at fault
        print(f"gam-pretrain: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
