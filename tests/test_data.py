import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import small_prep_config
from gam_pretrain.data import PrepError, ShardLoader, ShardSet, Source, SourceError, SourceSpec, run_prep, verify
from gam_pretrain.data.shards import validation_batches

QUIET = dict(log=lambda *a: None, progress=False)


def shard_hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.tar"))}


@pytest.fixture(scope="module")
def tokenizer_file(prepared_small):
    return str(prepared_small.path / "tokenizer.json")


def test_one_and_two_workers_write_identical_shards(tmp_path, tokenizer_file):
    cfg = small_prep_config(tokenizer=tokenizer_file)
    one = run_prep(cfg, tmp_path / "one", workers=1, **QUIET)
    two = run_prep(cfg, tmp_path / "two", workers=2, **QUIET)
    assert shard_hashes(tmp_path / "one") == shard_hashes(tmp_path / "two") and len(shard_hashes(tmp_path / "one")) > 5
    assert one == two
    assert (tmp_path / "one/manifest.json").read_bytes() == (tmp_path / "two/manifest.json").read_bytes()
    verify(tmp_path / "two", log=lambda *a: None)


def test_manifest_describes_every_shard(prepared_small):
    m = prepared_small.manifest
    assert (m["sample_length"], m["dtype"], m["tokenizer"]["vocab_size"]) == (33, "uint16", 512)
    train = m["splits"]["train"]
    assert train["samples"] == sum(s["samples"] for s in train["shards"]) and train["documents"] == 39
    assert train["tokens"] == train["samples"] * 33
    for shard in train["shards"]:
        assert hashlib.sha256((prepared_small.path / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
    tok_sha = hashlib.sha256((prepared_small.path / "tokenizer.json").read_bytes()).hexdigest()
    assert m["tokenizer"]["sha256"] == tok_sha and len(m["source_fingerprint"]) == 64


def test_shards_are_plain_webdataset(prepared_small):
    import webdataset as wds

    shard = prepared_small.shards("train")[0]
    samples = list(wds.WebDataset(str(prepared_small.path / shard["path"]), shardshuffle=False).decode())
    assert len(samples) == shard["samples"]
    first = samples[0]["input_ids.npy"]
    assert first.dtype == np.uint16 and first.shape == (33,)
    # windows overlap by one token: sample i+1 starts where sample i's last input ends
    assert samples[1]["input_ids.npy"][0] == first[32]


def test_prep_killed_midway_resumes_to_the_same_manifest(tmp_path, tokenizer_file):
    args = [sys.executable, "-m", "gam_pretrain", "prep", "embedded", "--prep.tokenizer", tokenizer_file,
            "--prep.vocab_size", "512", "--prep.block_size", "32", "--prep.documents_per_unit", "1", "--progress=false"]
    reference = tmp_path / "reference"
    subprocess.run(args + ["--out", str(reference)], check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((killed / ".units").glob("*.json"))) < 5 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((killed / ".units").glob("*.json")))
    assert 5 <= done < 42 and not (killed / "manifest.json").exists(), "kill landed too late to test anything"
    subprocess.run(args + ["--out", str(killed)], check=True, capture_output=True)
    assert (killed / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    assert shard_hashes(killed) == shard_hashes(reference)
    assert not list(killed.glob("*.tmp"))


def _loader(data, rank, workers=2, seed=5, batch=128):
    return ShardLoader(data, "train", batch, seed=seed, rank=rank, world_size=2, num_workers=workers)


def _digest(batch):
    return hashlib.sha1(batch[0].numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("cross_epoch", [False, True])
def test_loader_resume_2_ranks_x_2_workers(prepared_small, cross_epoch):
    per_epoch = _loader(prepared_small, 0).batches_per_epoch
    n = per_epoch - 7 if cross_epoch else 25
    for rank in (0, 1):
        straight = _loader(prepared_small, rank)
        expected = [_digest(straight.next_batch()) for _ in range(2 * n)]
        first = _loader(prepared_small, rank)
        got = [_digest(first.next_batch()) for _ in range(n)]
        state = json.loads(json.dumps(first.state_dict()))  # a checkpoint stores it as plain data
        resumed = _loader(prepared_small, rank)
        resumed.load_state_dict(state)
        got += [_digest(resumed.next_batch()) for _ in range(n)]
        assert got == expected
        if cross_epoch:
            assert resumed.epoch == 1


def test_ranks_and_workers_see_disjoint_samples_covering_the_epoch(prepared_small):
    from collections import Counter

    seen = Counter()
    for rank in (0, 1):
        loader = _loader(prepared_small, rank)
        for _ in range(loader.batches_per_epoch):
            x, y = loader.next_batch()
            seen.update(map(bytes, np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1).astype(np.uint16)))
    everything = Counter(bytes(row) for shard in prepared_small.shards("train") for row in prepared_small.read(shard))
    assert not seen - everything  # no sample is served more often than it exists: the streams are disjoint
    total = sum(everything.values())
    assert total - 2 * 2 * 128 < sum(seen.values()) <= total  # and they cover the epoch, bar the remainders


def test_epochs_are_reshuffled_but_reproducible(prepared_small):
    a, b = _loader(prepared_small, 0, workers=0), _loader(prepared_small, 0, workers=0)
    e0 = [_digest(a.next_batch()) for _ in range(a.batches_per_epoch)]
    assert a.epoch == 1
    e1 = [_digest(a.next_batch()) for _ in range(5)]
    assert e1 != e0[:5] and [_digest(b.next_batch()) for _ in range(5)] == e0[:5]


def test_loader_refuses_resume_with_other_settings(prepared_small):
    state = _loader(prepared_small, 0).state_dict()
    other = ShardLoader(prepared_small, "train", 128, seed=5, rank=0, world_size=1, num_workers=2)
    with pytest.raises(ValueError, match="world_size=2.*this run has 1"):
        other.load_state_dict(state)


def test_validation_is_read_in_full_in_order(prepared_small):
    batches = list(validation_batches(prepared_small, "validation", 64))
    assert sum(len(x) for x, _ in batches) == prepared_small.manifest["splits"]["validation"]["samples"]
    again = list(validation_batches(prepared_small, "validation", 64))
    assert all((a[0] == b[0]).all() for a, b in zip(batches, again))


def test_corrupt_shard_is_named_by_verify_and_loader(tmp_path, tokenizer_file):
    out = tmp_path / "data"
    run_prep(small_prep_config(tokenizer=tokenizer_file, splits=["validation"]), out, **QUIET)
    victim = ShardSet(out).shards("validation")[0]["path"]
    data = (out / victim).read_bytes()
    (out / victim).write_bytes(data[: len(data) // 3])  # truncated
    with pytest.raises(PrepError, match=victim):
        verify(out, log=lambda *a: None)
    with pytest.raises(PrepError, match=victim):
        list(validation_batches(ShardSet(out), "validation", 8))
    proc = subprocess.run([sys.executable, "-m", "gam_pretrain", "verify", str(out)], capture_output=True, text=True)
    assert proc.returncode == 1 and victim in proc.stderr


# ---- sources --------------------------------------------------------------------------------------
def write_jsonl(path: Path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))


STORIES = [f"Once upon a time there was a {animal} who liked {food}. The end." for animal in
           ("cat", "dog", "fox", "owl", "bear", "frog") for food in ("apples", "honey", "fish", "bread", "rice")]


def test_local_files_txt_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first document\nstill first")
    write_jsonl(tmp_path / "b.jsonl", ["second", "third"])
    pq.write_table(pa.table({"body": ["fourth", "fifth"]}), tmp_path / "c.parquet")
    txt = Source(SourceSpec(kind="files", splits={"train": str(tmp_path / "*.txt")}))
    assert list(txt.documents("train")) == ["first document\nstill first"]
    lines = Source(SourceSpec(kind="files", splits={"train": str(tmp_path / "*.txt")}, txt_documents="lines"))
    assert list(lines.documents("train")) == ["first document", "still first"]
    js = Source(SourceSpec(kind="files", splits={"train": str(tmp_path / "b.jsonl")}))
    assert list(js.documents("train", 1)) == ["third"]
    pqs = Source(SourceSpec(kind="files", splits={"train": str(tmp_path / "*.parquet")}, text_field="body"))
    assert list(pqs.documents("train")) == ["fourth", "fifth"]


def test_hf_datasets_path_offline_local_files_and_directory(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", STORIES)
    write_jsonl(tmp_path / "validation.jsonl", STORIES[:6])
    files = {"train": [str(tmp_path / "train.jsonl")], "validation": [str(tmp_path / "validation.jsonl")]}
    regular = Source(SourceSpec(kind="hf", path="json", data_files=files))
    streamed = Source(SourceSpec(kind="hf", path="json", data_files=files, streaming=True))
    assert list(regular.documents("train")) == STORIES == list(streamed.documents("train"))
    assert list(streamed.documents("train", 3, 7)) == STORIES[3:7] == list(regular.documents("train", 3, 7))
    assert regular.num_documents("validation") == 6 and streamed.num_documents("validation") is None
    capped = Source(SourceSpec(kind="hf", path="json", data_files=files, max_documents={"train": 10}))
    assert regular.fingerprint(["train"]) != capped.fingerprint(["train"])
    assert capped.num_documents("train") == 10 and len(list(capped.documents("train"))) == 10
    # a local dataset directory, loaded by `datasets` with no builder name
    ds_dir = tmp_path / "mydataset" / "data"
    ds_dir.mkdir(parents=True)
    write_jsonl(ds_dir / "train.jsonl", STORIES)
    write_jsonl(ds_dir / "validation.jsonl", STORIES[:4])
    local = Source(SourceSpec(kind="hf", path=str(tmp_path / "mydataset")))
    assert list(local.documents("validation")) == STORIES[:4]


def test_streaming_prep_matches_regular_prep(tmp_path, tokenizer_file):
    write_jsonl(tmp_path / "train.jsonl", STORIES * 4)
    write_jsonl(tmp_path / "validation.jsonl", STORIES[:10])
    files = {"train": [str(tmp_path / "train.jsonl")], "validation": [str(tmp_path / "validation.jsonl")]}
    manifests = []
    for streaming in (False, True):
        spec = SourceSpec(kind="hf", path="json", data_files=files, streaming=streaming)
        cfg = small_prep_config(source=spec, tokenizer=tokenizer_file, block_size=16, documents_per_unit=7)
        manifests.append(run_prep(cfg, tmp_path / f"s{streaming}", workers=2, **QUIET))
    assert [m["splits"] for m in manifests][0] == [m["splits"] for m in manifests][1]


@pytest.mark.parametrize("streaming", [False, True])
def test_prep_in_phases_as_array_tasks_matches_one_process(tmp_path, tokenizer_file, streaming):
    """plan, then 3 'array tasks' (out of order), then finalize == run_prep; finalize refuses early."""
    from gam_pretrain.data.prep import finalize_prep, plan_prep, run_units

    write_jsonl(tmp_path / "train.jsonl", STORIES * 4)
    write_jsonl(tmp_path / "validation.jsonl", STORIES[:10])
    files = {"train": [str(tmp_path / "train.jsonl")], "validation": [str(tmp_path / "validation.jsonl")]}
    spec = SourceSpec(kind="hf", path="json", data_files=files, streaming=streaming)
    cfg = small_prep_config(source=spec, tokenizer=tokenizer_file, block_size=16, documents_per_unit=7)
    run_prep(cfg, tmp_path / "whole", **QUIET)
    out = tmp_path / "phased"
    plan_prep(cfg, out, log=lambda *a: None)
    run_units(out, 2, 3)
    with pytest.raises(PrepError, match="not done yet"):
        finalize_prep(out, log=lambda *a: None)
    run_units(out, 0, 3)
    run_units(out, 1, 3)
    finalize_prep(out, log=lambda *a: None)
    assert (out / "manifest.json").read_bytes() == (tmp_path / "whole" / "manifest.json").read_bytes()
    assert shard_hashes(out) == shard_hashes(tmp_path / "whole")
    with pytest.raises(PrepError, match="outside"):
        run_units(out, 3, 3)


def test_bad_inputs_fail_with_one_clear_message(tmp_path, tokenizer_file):
    missing = small_prep_config(source=SourceSpec(kind="files", splits={"train": str(tmp_path / "nope*.txt")}))
    with pytest.raises(SourceError, match="no file matches"):
        run_prep(missing, tmp_path / "a", **QUIET)
    (tmp_path / "empty.txt").write_text("")
    empty = small_prep_config(tokenizer=tokenizer_file, splits=["train"], source=SourceSpec(
        kind="files", splits={"train": str(tmp_path / "empty.txt")}, txt_documents="lines"))
    with pytest.raises(PrepError, match="empty"):
        run_prep(empty, tmp_path / "b", **QUIET)
    with pytest.raises(SourceError, match="no files configured for split 'validation'"):
        run_prep(small_prep_config(tokenizer=tokenizer_file, source=SourceSpec(
            kind="files", splits={"train": str(tmp_path / "empty.txt")})), tmp_path / "c", **QUIET)
    with pytest.raises(PrepError, match="tokenizer file not found"):
        run_prep(small_prep_config(tokenizer=str(tmp_path / "missing.json")), tmp_path / "d", **QUIET)


def test_undecodable_bytes_are_replaced_and_counted(tmp_path, tokenizer_file):
    (tmp_path / "bad.txt").write_bytes(b"good text " * 40 + b"\xff\xfe broken \xc3 bytes " + b"more text " * 40)
    spec = SourceSpec(kind="files", splits={"train": str(tmp_path / "bad.txt"), "validation": str(tmp_path / "bad.txt")})
    manifest = run_prep(small_prep_config(source=spec, tokenizer=tokenizer_file, block_size=8), tmp_path / "o", **QUIET)
    assert manifest["splits"]["train"]["replaced_characters"] == 3


def test_prep_refuses_to_mix_configurations(tmp_path, tokenizer_file):
    run_prep(small_prep_config(tokenizer=tokenizer_file, splits=["validation"]), tmp_path, **QUIET)
    with pytest.raises(PrepError, match="different configuration"):
        run_prep(small_prep_config(tokenizer=tokenizer_file, splits=["validation"], block_size=64), tmp_path, **QUIET)


def test_cli_prep_then_verify(tmp_path, tokenizer_file):
    out = tmp_path / "shards"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, "-m", "gam_pretrain", "prep", "embedded", "--out", str(out), "--prep.tokenizer",
                    tokenizer_file, "--prep.block_size", "32", "--workers", "2", "--progress", "false"], check=True,
                   env=env, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "gam_pretrain", "verify", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0 and "all shards match" in proc.stdout


def test_gpt2_style_vocab_and_merges_folder(tmp_path, prepared_small):
    # A byte-level BPE saved as vocab.json + merges.txt (the GPT-2 layout), with GPT-2's separator.
    from tokenizers import AddedToken

    tok = prepared_small.tokenizer()
    tok.model.save(str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    vocab["<|endoftext|>"] = vocab.pop("<eos>")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    spec = SourceSpec(kind="embedded")
    manifest = run_prep(small_prep_config(source=spec, tokenizer=str(tmp_path), splits=["validation"]),
                        tmp_path / "out", **QUIET)
    reference = prepared_small.manifest["splits"]["validation"]
    assert manifest["splits"]["validation"]["tokens"] == reference["tokens"]
    assert [s["sha256"] for s in manifest["splits"]["validation"]["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert AddedToken  # the special token needs no registration: it is an ordinary vocabulary entry


def test_full_disk_stops_prep_with_a_clear_message_and_keeps_finished_units(tmp_path, tokenizer_file):
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"needs permission to mount a tmpfs (root): {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(PrepError, match="disk full"):
            run_prep(small_prep_config(tokenizer=tokenizer_file, documents_per_unit=1), mount_point / "out", **QUIET)
        out = mount_point / "out"
        assert not (out / "manifest.json").exists() and not list(out.rglob("*.tmp"))
        finished = [json.loads(p.read_text()) for p in (out / ".units").glob("*.json")]
        assert finished and all((out / s["path"]).stat().st_size == s["bytes"] for r in finished for s in r["shards"])
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
