import subprocess
import sys

import pytest
import yaml

from gam_pretrain.cli import main
from gam_pretrain.config import ConfigError, RunConfig, dump_yaml, load_config, validate


def test_override_forms():
    cfg = load_config(None, ["--optim.lr", "1e-3", "--train.max_steps=7", "model.attention=naive", "train.compile=true"])
    assert cfg.optim.lr == 1e-3 and cfg.train.max_steps == 7 and cfg.model.attention == "naive" and cfg.train.compile


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
        ("train.compile=maybe", "expected bool"),
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
