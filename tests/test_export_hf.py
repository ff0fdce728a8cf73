"""Exports load in Hugging Face transformers, offline, without gam_pretrain: config, model, tokenizer,
logits, generate()."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from test_checkpoint_trust import run

pytest.importorskip("transformers")

FAMILIES = {
    "gam": ["model.arch=gam"],
    "gam-assoc": ["model.arch=gam-assoc"],
    "transformer-naive": ["model.arch=transformer", "model.attention=naive"],
    "transformer-sdpa": ["model.arch=transformer", "model.attention=sdpa"],
    "mamba-paper": ["model.arch=mamba", "model.stack=paper"],
    "mamba-standard": ["model.arch=mamba", "model.stack=standard"],
}

# Runs in a fresh interpreter where gam_pretrain cannot be imported: each export of the list loads alone.
LOAD_WITH_TRANSFORMERS = textwrap.dedent("""
    import json, sys
    sys.modules["gam_pretrain"] = None  # any import of gam_pretrain now fails: the export must stand alone
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    for job in json.load(open(sys.argv[1])):
        export = job["export"]
        config = AutoConfig.from_pretrained(export, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(export)
        ids = torch.tensor(job["ids"])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            loss = model(input_ids=ids, labels=ids).loss
        prompt = tokenizer("The", return_tensors="pt")
        generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
        json.dump({"model_type": config.model_type, "hidden_size": config.hidden_size,
                   "logits": logits.tolist(), "loss": loss.item(), "prompt": prompt["input_ids"][0].tolist(),
                   "generated": generated[0].tolist(), "text": tokenizer.decode(generated[0]),
                   "module": type(model).__module__}, open(job["out"], "w"))
""")


def test_exports_load_in_transformers_alone_with_our_logits(tmp_path, prepared_small):
    """Every family: AutoConfig, AutoModelForCausalLM and AutoTokenizer load the export offline in a
    process without gam_pretrain; logits to 1e-5, the loss from labels, greedy generate() = ours; no
    absolute path inside."""
    from gam_pretrain.cli import main
    from gam_pretrain.data.tokenizer import load_tokenizer
    from gam_pretrain.eval.generate import generate
    from gam_pretrain.export import load_export

    jobs = []
    for family, overrides in FAMILIES.items():
        run(tmp_path, prepared_small, family, 2, *overrides)
        export = tmp_path / "exports" / family
        assert main(["export", str(tmp_path / family), "--out", str(export)]) == 0
        config = json.loads((export / "config.json").read_text())
        assert config["model_type"] == "gam_pretrain" and "AutoModelForCausalLM" in config["auto_map"]
        inside = "".join(p.read_text() for p in export.iterdir() if p.suffix in (".json", ".py"))
        assert str(tmp_path) not in inside, f"{family}: an absolute path in a shared export"
        ids = torch.randint(0, config["model"]["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(0))
        jobs.append({"family": family, "export": str(export), "ids": ids.tolist(), "out": str(tmp_path / f"{family}.json")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", LOAD_WITH_TRANSFORMERS, str(tmp_path / "jobs.json")], cwd=tmp_path,
                          env={**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for job in jobs:
        family, got = job["family"], json.loads(open(job["out"]).read())
        model, _, tokenizer = load_export(job["export"])
        ids = torch.tensor(job["ids"])
        assert got["model_type"] == "gam_pretrain" and got["hidden_size"] == model.cfg.d_model, family
        assert got["module"].endswith("modeling_gam_pretrain"), family
        with torch.no_grad():
            ours = model(ids)
            _, our_loss = model(ids[:, :-1], ids[:, 1:])
        torch.testing.assert_close(torch.tensor(got["logits"]), ours, rtol=0, atol=1e-5, msg=family)
        assert got["loss"] == pytest.approx(our_loss.item(), rel=1e-5), family
        assert got["prompt"] == load_tokenizer(Path(job["export"]) / "tokenizer.json").encode("The").ids, family
        greedy = generate(model, got["prompt"], 5, model.cfg.block_size, temperature=0)
        assert got["generated"] == got["prompt"] + greedy, family
        assert got["text"] == tokenizer.decode(got["prompt"] + greedy), family


def test_export_names_its_data_relative_to_itself(tmp_path, prepared_small, capsys):
    """eval finds the training data from the export's relative data_path; moved elsewhere, it asks for --data."""
    from gam_pretrain.cli import main

    run(tmp_path, prepared_small, "r", 2)
    export = tmp_path / "shared" / "export"
    assert main(["export", str(tmp_path / "r"), "--out", str(export)]) == 0
    config = json.loads((export / "config.json").read_text())
    assert not os.path.isabs(config["data_path"]) and not os.path.isabs(config["checkpoint"])
    assert (export / config["checkpoint"] / "COMPLETE").is_file()
    capsys.readouterr()
    assert main(["eval", str(export)]) == 0
    assert "val_loss" in json.loads(capsys.readouterr().out)
    moved = tmp_path / "elsewhere" / "deeper" / "export"
    moved.parent.mkdir(parents=True)
    export.rename(moved)
    assert main(["eval", str(moved)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(moved) in err and "--data" in err
    assert main(["eval", str(moved), "--data", str(prepared_small.path)]) == 0
