import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gam_pretrain.cli import main
from gam_pretrain.config import ConfigError, RunConfig, dump_yaml, load_config, validate


def test_override_forms():
    cfg = load_config(None, ["--optim.lr", "1e-3", "--train.max_steps=7", "model.attention=naive", "train.accel=compile"])
    assert cfg.optim.lr == 1e-3 and cfg.train.max_steps == 7 and cfg.model.attention == "naive" and cfg.train.accel == "compile"


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  arch: mamba\n  d_model: 64\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["model.d_model=96"])
    assert (cfg.model.arch, cfg.model.d_model, cfg.optim.lr) == ("mamba", 96, 1e-3)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["model.arch=transformer", "optim.beta2=0.99"])
    dump_yaml(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("modle.arch=gam", "unknown config key 'modle'"),
        ("model.attention=flash", "valid choices: naive, sdpa"),
        ("train.max_steps=ten", "expected int"),
        ("train.progress=maybe", "expected bool"),
    ],
)
def test_bad_override_names_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_config(None, [override])


def test_unknown_key_lists_valid_choices():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.lrr=1"])
    assert "lr, beta1, beta2" in str(err.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  bath_size: 8\n")
    with pytest.raises(ConfigError, match="train.bath_size.*bad.yaml"):
        load_config(path)


def test_validate_rejects_impossible_values():
    for override in ("model.arch=gpt5", "train.batch_size=0", "model.dropout=1.5"):
        with pytest.raises(ConfigError):
            validate(load_config(None, [override]))
    cfg = load_config(None, ["model.arch=transformer", "model.d_model=100", "model.n_heads=8"])
    with pytest.raises(ConfigError, match="divisible"):
        validate(cfg)


def test_cli_config_typo_exits_2(capsys):
    assert main(["train", "--optim.lrr", "1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "valid keys" in err


def test_console_entry_point_exits_2():
    proc = subprocess.run([sys.executable, "-m", "gam_pretrain", "train", "model.arch=gpt5"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "model.arch" in proc.stderr and "gam-sum" in proc.stderr
    assert proc.stderr.count("\n") == 1  # one clear line, no traceback


def test_defaults_are_the_paper_setting():
    cfg = RunConfig()
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay, cfg.optim.grad_clip) == (
        3e-4, 0.9, 0.95, 0.1, 1.0)
    assert (cfg.optim.warmup_steps, cfg.train.batch_size, cfg.train.epochs, cfg.model.dropout) == (100, 32, 5.0, 0.1)
    assert yaml.safe_load(open("configs/paper/wikitext2.yaml"))["model"]["attention"] == "naive"


def _gam(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gam_pretrain", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@pytest.mark.parametrize("command,schema", [(["train"], "RunConfig"), (["launch", "train"], "RunConfig"),
                                            (["prep"], "PrepCommand"), (["launch", "prep"], "LaunchPrepCommand"),
                                            (["sweep"], "SweepSpec")])
def test_help_lists_every_key_with_type_default_and_meaning(command, schema, capsys):
    import gam_pretrain.config as config
    from gam_pretrain.sweep.spec import SweepSpec

    cls = SweepSpec if schema == "SweepSpec" else getattr(config, schema)
    rows = config.key_table(cls())
    assert all(meaning for _, _, _, meaning in rows), [key for key, _, _, meaning in rows if not meaning]
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    for key, type_, default, meaning in rows:
        line = next((l for l in shown.splitlines() if l.strip().startswith(f"--{key} ")), None)
        assert line is not None, key
        assert type_ in line and f"({default})" in line and meaning[:30] in line, line


def test_print_config_prints_the_resolved_yaml_and_exits(tmp_path):
    proc = _gam("train", "--config", "configs/quickstart.yaml", "--train.max_steps", "7", "--print-config",
                "--train.out_dir", tmp_path / "never")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["train"]["max_steps"] == 7 and printed["model"]["d_model"] == 128  # file, then overrides
    assert load_config(None, [f"{s}.{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                              for s, section in printed.items() for k, v in section.items()]) == load_config(
        "configs/quickstart.yaml", ["--train.max_steps", "7", "--train.out_dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


def test_prep_takes_dotted_keys_over_its_recipe(tmp_path):
    proc = _gam("prep", "wikitext2", "--out", tmp_path / "wt2", "--prep.vocab_size", "8000", "--workers=3",
                "prep.source.splits.validation=validation[:10]", "--print-config")
    assert proc.returncode == 0, proc.stderr
    cmd = yaml.safe_load(proc.stdout)
    assert cmd["prep"]["vocab_size"] == 8000 and cmd["workers"] == 3  # overridden
    assert cmd["prep"]["block_size"] == 256 and cmd["prep"]["source"]["name"] == "wikitext-2-raw-v1"  # the recipe's
    assert cmd["prep"]["source"]["splits"] == {"train": "train", "validation": "validation[:10]", "test": "test"}
    assert not (tmp_path / "wt2").exists()


@pytest.mark.parametrize("args,fragment", [
    (["prep", "embedded", "--out", "x", "--prep.vocab_sise", "8"], "unknown config key 'prep.vocab_sise'"),
    (["prep", "embedded", "--out", "x", "--phase", "some"], "valid choices: all, plan, units, finalize"),
    (["prep", "nosuch", "--out", "x"], "invalid value 'nosuch' for 'recipe'"),
    (["prep", "embedded"], "set 'out'"),
    (["launch", "prep", "embedded", "--out", "x", "--launch.nodez", "2"], "unknown config key 'launch.nodez'"),
    (["sweep", "configs/sweeps/tiny_cpu.yaml", "--lr.rule", "magic"], "valid choices: constant, scaled, grid"),
    (["train", "--data.recipe", "nosuch"], "invalid value 'nosuch' for 'data.recipe'"),
])
def test_every_command_names_a_bad_key_in_one_line_and_exits_2(args, fragment, tmp_path, monkeypatch, capsys):
    """In this process (a fresh one per command costs seconds each; test_console_entry_point_exits_2
    runs the real entry point)."""
    if args[0] == "sweep":
        args = ["sweep", str(Path(__file__).resolve().parent.parent / args[1]), *args[2:]]
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_train_without_prepared_data_names_the_prep_command(tmp_path):
    """A missing recipe prep is never started silently: train stops, naming the command to run."""
    overrides = ["--data.recipe", "embedded", "--data.cache_dir", tmp_path / "cache", "--model.vocab_size", "512",
                 "--model.block_size", "32", "--train.out_dir", tmp_path / "runs"]
    proc = _gam("train", *overrides)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "gam-pretrain prep embedded --out" in proc.stderr and "data.prep_if_missing=true" in proc.stderr
    assert not (tmp_path / "cache").exists()
    command = proc.stderr.split("`")[1].split()[1:]  # the printed command, minus the program name
    # as printed, on a slice of the corpus (the command line is what is tested, not the prep)
    assert _gam(*command, "--prep.source.max_documents.train", "2", "--prep.source.max_documents.validation", "1",
                "--progress", "false").returncode == 0
    again = _gam("train", *overrides, "--print-config")
    assert again.returncode == 0


def test_settings_added_later_keep_older_sweep_run_names():
    """A sweep expanded before model.init, data.packing, ... existed keeps its run names (the hash of
    the default config is the one the code before them gave); a non-default value changes it."""
    from gam_pretrain.config import ADDED_SINCE_FIRST_RUNS
    from gam_pretrain.sweep.spec import content_hash

    assert content_hash(RunConfig()) == "d846944c4a"
    other = {"model.init": "torch-default", "model.mix_dropout": False, "optim.decay": "all",
             "optim.warmup_from_zero": True, "data.tokenizer_splits": ["all"], "data.packing": "paper",
             "train.eval_mean": "batches", "train.micro_batch_size": 4, "data.mixture": {"data/a": 1.0},
             "data.mixture_max_epochs": {"data/a": 2.0}, "train.profile_steps": [1, 2], "optim.decay_fraction": 0.5,
             "optim.decay_start": 7, "train.cooldown_from": "runs/s/checkpoints/step_00000010",
             "model.assoc_conv": 4}
    assert other.keys() == ADDED_SINCE_FIRST_RUNS.keys()
    for key, value in other.items():
        cfg, later = RunConfig(), RunConfig()
        if key == "model.assoc_conv":  # only gam-assoc reads it
            cfg.model.arch = later.model.arch = "gam-assoc"
        section, name = key.split(".")
        setattr(getattr(later, section), name, value)
        assert content_hash(later) != content_hash(cfg), key
    # gam-assoc's conv leaves other families' run names as they were, whatever its value; an older
    # unread setting (a Transformer's mix_dropout) keeps the part of the name it always had
    unread = RunConfig()
    unread.model.assoc_conv = 4
    assert content_hash(unread) == "d846944c4a"
    transformer, no_mix_dropout = RunConfig(), RunConfig()
    transformer.model.arch = no_mix_dropout.model.arch = "transformer"
    no_mix_dropout.model.mix_dropout = False
    assert (content_hash(transformer), content_hash(no_mix_dropout)) == ("37d2b91b7a", "9d6f17f5d4")  # 338c61b's names


def test_the_global_batch_is_cut_by_the_world_size_or_refused_in_one_line():
    from gam_pretrain.config import BatchLayout, TrainConfig, batch_layout

    assert batch_layout(TrainConfig(batch_size=32, grad_accum=2), 4) == BatchLayout(32, 4, 4, 2)
    # a fixed micro-batch keeps memory per rank: the accumulation follows from the world size
    assert batch_layout(TrainConfig(batch_size=32, micro_batch_size=4), 2) == BatchLayout(32, 2, 4, 4)
    assert batch_layout(TrainConfig(batch_size=32, micro_batch_size=4), 8) == BatchLayout(32, 8, 4, 1)
    for train, world, message in ((TrainConfig(batch_size=16), 3, "does not divide among 3 ranks"),
                                  (TrainConfig(batch_size=16, grad_accum=3), 2, "'train.grad_accum' \\(3\\)"),
                                  (TrainConfig(batch_size=16, micro_batch_size=3), 2, "'train.micro_batch_size'")):
        with pytest.raises(ConfigError, match=message) as caught:
            batch_layout(train, world)
        assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="set only one of"):
        validate(load_config(None, ["train.micro_batch_size=4", "train.grad_accum=2"]))


def test_compile_graphs_and_gpu_scans_are_refused_where_they_cannot_run():
    """CUDA graphs replay into the buffers autograd keeps as .grad: accumulation, sharding or DDP
    engines and recomputed blocks are refused; a GPU scan is refused on a CPU device."""
    ok = ["train.accel=compile-graphs", "train.batch_size=8"]
    validate(load_config(None, ok))
    for extra in ("train.grad_accum=2", "engine.kind=ddp", "engine.activation_checkpointing=true"):
        with pytest.raises(ConfigError, match="'train.accel' compile-graphs runs with engine.kind single"):
            validate(load_config(None, ok + [extra]))
    for scan in ("triton", "cuda"):
        with pytest.raises(ConfigError, match=f"'model.scan' {scan} needs a CUDA device"):
            validate(load_config(None, ["model.arch=mamba", f"model.scan={scan}", "train.device=cpu"]))
    validate(load_config(None, ["model.arch=mamba", "model.scan=chunked"]))


def test_profile_steps_are_a_first_and_last_step():
    validate(load_config(None, ["train.profile_steps=[2, 5]"]))
    for bad in ("[5, 2]", "[0, 3]", "[3]"):
        with pytest.raises(ConfigError, match=r"'train.profile_steps' must be \[first, last\]"):
            validate(load_config(None, [f"train.profile_steps={bad}"]))


def test_version_is_the_package_version(capsys):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from gam_pretrain.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    declared = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"gam-pretrain {declared}"
