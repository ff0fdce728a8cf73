"""`gam-pretrain evaluate`: lm-evaluation-harness over an export, offline, on tasks defined from local
jsonl files; the harness's numbers against our own log-likelihoods of the same texts."""
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from test_checkpoint_trust import run

pytest.importorskip("lm_eval")

PAIRS = [("The king of", " the land"), ("She said that", " it was"), ("In the year", " 1900,"),
         ("He went to the", " city"), ("It is", " a good")]
TEXTS = ["The river ran by the town.", "A man and his dog walked home.", "They sang all night long."]
PROMPTS = ["The queen", "Once upon a", "It was a"]

TASKS = {
    "toy_ll": """task: toy_ll
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/pairs.jsonl}}}}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - {{metric: perplexity, aggregation: perplexity, higher_is_better: false}}
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
""",
    "toy_rolling": """task: toy_rolling
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/texts.jsonl}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - {{metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
  - {{metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
""",
    "toy_gen": """task: toy_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/prompts.jsonl}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs: {{until: ["."], max_gen_toks: 6, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
""",
}


def log_prob(model, context: list[int], target: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([context + target])
    with torch.no_grad():
        log_probs = F.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0, len(context) - 1:]
    wanted = torch.tensor(target)
    return log_probs.gather(1, wanted[:, None]).sum().item(), bool((log_probs.argmax(-1) == wanted).all())


def test_harness_numbers_equal_our_log_likelihoods(tmp_path, prepared_small, capsys):
    from gam_pretrain.cli import main
    from gam_pretrain.data.tokenizer import eos_id
    from gam_pretrain.eval.generate import generate
    from gam_pretrain.export import load_export

    run(tmp_path, prepared_small, "r", 3)
    export = tmp_path / "export"
    assert main(["export", str(tmp_path / "r"), "--out", str(export)]) == 0
    model, _, tok = load_export(export)
    enc = lambda s: tok.encode(s).ids  # noqa: E731
    # what the harness asks for, computed here directly: continuation | context (split as the harness splits)
    lls = []
    for context, continuation in PAIRS:
        whole, ctx = enc(context + continuation), enc(context)
        lls.append(log_prob(model, ctx, whole[len(ctx):]))
    eot = eos_id(tok)
    rolling = [log_prob(model, [eot], enc(text))[0] for text in TEXTS]
    assert all(len(enc(t)) < model.cfg.block_size for t in TEXTS)  # one window each: a direct computation
    targets = []
    for prompt in PROMPTS:
        text = tok.decode(generate(model, enc(prompt), 6, model.cfg.block_size, temperature=0))
        targets.append(text.split(".")[0])

    data = tmp_path / "tasks"
    data.mkdir()
    (data / "pairs.jsonl").write_text("".join(json.dumps({"context": c, "continuation": x}) + "\n" for c, x in PAIRS))
    (data / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (data / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n"
                                                for p, t in zip(PROMPTS, targets)))
    for name, yaml in TASKS.items():
        (data / f"{name}.yaml").write_text(yaml.format(data=data))
    out = tmp_path / "harness.json"
    capsys.readouterr()
    assert main(["evaluate", str(export), "--tasks", ",".join(TASKS), "--include-path", str(data),
                 "--batch-size", "2", "--out", str(out)]) == 0
    got = json.loads(out.read_text())["results"]
    assert got["toy_ll"]["perplexity,none"] == pytest.approx(math.exp(-sum(ll for ll, _ in lls) / len(lls)), rel=1e-5)
    assert got["toy_ll"]["acc,none"] == pytest.approx(sum(g for _, g in lls) / len(lls))
    words = sum(len(re.split(r"\s+", t)) for t in TEXTS)
    assert got["toy_rolling"]["word_perplexity,none"] == pytest.approx(math.exp(-sum(rolling) / words), rel=1e-5)
    nbytes = sum(len(t.encode()) for t in TEXTS)
    assert got["toy_rolling"]["byte_perplexity,none"] == pytest.approx(math.exp(-sum(rolling) / nbytes), rel=1e-5)
    assert got["toy_gen"]["exact_match,none"] == 1.0  # the harness's generations are ours
    assert "toy_ll" in json.loads(capsys.readouterr().out)


def test_evaluate_names_what_is_wrong_in_one_line(tmp_path, capsys):
    """Checked before the export is read: every one of these fails in one line, whatever the export."""
    from gam_pretrain.cli import main

    export = tmp_path / "not-read"
    for argv, named in ((["--tasks", "no_such_task_anywhere"], "no_such_task_anywhere"),
                        (["--tasks", "x", "--include-path", str(tmp_path / "none")], str(tmp_path / "none")),
                        (["--tasks", "x", "--batch-size", "0"], "--batch-size"),
                        (["--tasks", "x", "--limit", "0"], "--limit")):
        capsys.readouterr()
        assert main(["evaluate", str(export), *argv]) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err
