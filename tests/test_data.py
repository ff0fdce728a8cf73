import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import small_prep_config
from gam_pretrain.data import PrepConfig, PrepError, ShardLoader, ShardSet, Source, SourceError, SourceSpec, run_prep, verify
from gam_pretrain.data.shards import _EpochOrder, validation_batches

QUIET = dict(log=lambda *a: None, progress=False)


def shard_hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.tar"))}


@pytest.fixture(scope="module")
def tokenizer_file(prepared_small):
    return str(prepared_small.path / "tokenizer.json")


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


def test_shards_are_plain_webdataset_and_datasets_reads_them(prepared_small):
    """A member is one WebDataset example holding rows of samples; its decode is `.reshape(-1, L)`
    (the README's recipe): plain webdataset and `datasets.load_dataset("webdataset")` both give the
    samples our reader gives, in order."""
    import datasets
    import webdataset as wds

    shard = prepared_small.shards("train")[0]
    path = str(prepared_small.path / shard["path"])
    ours = prepared_small.read(shard)
    examples = list(wds.WebDataset(path, shardshuffle=False).decode())
    rows = np.concatenate([e["input_ids.npy"].reshape(-1, 33) for e in examples])
    assert rows.dtype == np.uint16 and rows.shape == (shard["samples"], 33)
    np.testing.assert_array_equal(rows, ours)
    # windows overlap by one token: sample i+1 starts where sample i's last input ends
    assert rows[1][0] == rows[0][32]
    hf = datasets.load_dataset("webdataset", data_files={"train": path}, split="train")
    np.testing.assert_array_equal(np.concatenate([np.asarray(e["input_ids.npy"]).reshape(-1, 33) for e in hf]), ours)


@pytest.mark.parametrize("block", [128, 256, 2048])
def test_tar_overhead_is_under_five_percent(block, tokenizer_file, tmp_path):
    """Shard bytes beyond the token bytes (tar headers, padding, .npy headers), over the embedded
    corpus's validation split (3 documents, 181k tokens) at the default samples_per_shard."""
    out = tmp_path / "data"
    run_prep(small_prep_config(tokenizer=tokenizer_file, block_size=block, documents_per_unit=1000,
                               samples_per_shard=2048, splits=["validation"]), out, workers=1, **QUIET)
    manifest = ShardSet(out).manifest
    shards = manifest["splits"]["validation"]["shards"]
    tar = sum((out / s["path"]).stat().st_size for s in shards)
    tokens = sum(s["tokens"] for s in shards) * np.dtype(manifest["dtype"]).itemsize
    assert tokens > 0 and (tar - tokens) / tar < 0.05, (block, len(shards), tar, tokens)


def test_shard_sets_of_format_1_are_read_and_unknown_formats_refused(prepared_small, tmp_path):
    """Format 1 (one sample per tar member, before compact shards) reads as the same samples; a
    version this reader does not know is refused in one line naming the manifest."""
    from gam_pretrain.data.prep import npy_bytes, tar_bytes

    old = linked_copy(prepared_small, tmp_path / "v1")
    keep_only_shards(old, [prepared_small.shards(split)[0]["path"] for split in ("train", "validation")])
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 1
    for shard in manifest["splits"]["train"]["shards"] + manifest["splits"]["validation"]["shards"]:
        rows = prepared_small.read(shard)
        data = tar_bytes([(f"s-{i:07d}.input_ids.npy", npy_bytes(row)) for i, row in enumerate(rows)])
        (old / shard["path"]).unlink()
        (old / shard["path"]).write_bytes(data)
        shard["sha256"] = hashlib.sha256(data).hexdigest()
    (old / "manifest.json").write_text(json.dumps(manifest))
    v1 = ShardSet(old)
    np.testing.assert_array_equal(v1.read(v1.shards("train")[0]), prepared_small.read(prepared_small.shards("train")[0]))
    verify(old, log=lambda *a: None)
    manifest["format_version"] = 3
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PrepError, match=r"manifest.json has shard format version 3; .* reads versions 1, 2"):
        ShardSet(old)


def _loader(data, rank=0, world=2, workers=2, seed=5, batch=128, micro=0):
    return ShardLoader(data, "train", batch, seed=seed, rank=rank, world_size=world, micro_batch_size=micro,
                       num_workers=workers)


def _digest(batch):
    return hashlib.sha1(batch[0].numpy().tobytes()).hexdigest()


def _rows(micro_batches) -> np.ndarray:
    """A step's samples as stored (block_size + 1 tokens), micro-batches in order."""
    return np.concatenate([np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1) for x, y in micro_batches])


def _global_steps(loaders, steps):
    """Each step's samples and ids over all ranks (rank order)."""
    out = []
    for _ in range(steps):
        parts = [(_rows(loader.next_step()), loader.last_sample_ids) for loader in loaders]
        out.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
    return out


@pytest.mark.parametrize("cross_epoch", [False, True])
def test_sample_order_is_the_seeds_alone_and_resumes_at_any_world_size_and_worker_count(prepared_small, prepared_tiny,
                                                                                        cross_epoch):
    # across an epoch: the tiny corpus (an epoch is 8 global batches of 16), micro-batches of 4
    data, batch, micro = (prepared_tiny, 16, 4) if cross_epoch else (prepared_small, 128, 16)
    per_epoch = _loader(data, world=1, workers=0, batch=batch).steps_per_epoch
    n = per_epoch - 3 if cross_epoch else 5
    straight = _global_steps([_loader(data, world=1, workers=0, batch=batch)], 2 * n)
    # world 2 x 2 workers with micro-batches, then a resume at world 1 (1 worker), then world 4 (no workers)
    first = [_loader(data, rank=r, world=2, workers=2, batch=batch, micro=micro) for r in (0, 1)]
    got = _global_steps(first, n // 2)
    state = json.loads(json.dumps(first[0].state_dict()))  # a checkpoint stores it as plain data
    assert state == first[1].state_dict()
    second = _loader(data, world=1, workers=1, batch=batch)
    second.load_state_dict(state)
    got += _global_steps([second], n - n // 2)
    third = [_loader(data, rank=r, world=4, workers=0, batch=batch) for r in range(4)]
    for loader in third:
        loader.load_state_dict(json.loads(json.dumps(second.state_dict())))
    got += _global_steps(third, n)
    for step, ((rows, ids), (want_rows, want_ids)) in enumerate(zip(got, straight)):
        assert np.array_equal(ids, want_ids) and np.array_equal(rows, want_rows), step
    if cross_epoch:
        assert third[0].epoch == 1


def test_a_global_batch_is_cut_into_micro_batches_per_rank(prepared_small):
    loaders = [_loader(prepared_small, rank=r, world=2, workers=0, batch=32, micro=4) for r in (0, 1)]
    micro = loaders[0].next_step()
    assert [len(x) for x, _ in micro] == [4] * 4
    with pytest.raises(ValueError, match="global batch of 30 does not cut into 4 rank"):
        _loader(prepared_small, world=4, batch=30)


def test_ranks_and_workers_see_every_sample_of_the_epoch_once(prepared_tiny):
    from collections import Counter

    loaders = [_loader(prepared_tiny, rank=r, batch=16) for r in (0, 1)]
    steps = _global_steps(loaders, loaders[0].steps_per_epoch)
    ids = np.concatenate([i for _, i in steps])
    total = sum(s["samples"] for s in prepared_tiny.shards("train"))
    assert len(set(ids.tolist())) == len(ids) == total // 16 * 16  # each once, bar the remainder
    assert ids.min() >= 0 and ids.max() < total
    # the ids name the samples: id i is row i of the split in manifest order
    everything = np.concatenate([prepared_tiny.read(shard) for shard in prepared_tiny.shards("train")])
    rows = np.concatenate([r for r, _ in steps])
    assert np.array_equal(rows, everything[ids])
    assert not Counter(map(bytes, rows.astype(np.uint16))) - Counter(map(bytes, everything))


def test_epochs_are_reshuffled_but_reproducible(prepared_small):
    a, b = _loader(prepared_small, world=1, workers=0), _loader(prepared_small, world=1, workers=0)
    e0 = [_digest(a.next_step()[0]) for _ in range(a.steps_per_epoch)]
    assert a.epoch == 1
    e1 = [_digest(a.next_step()[0]) for _ in range(5)]
    assert e1 != e0[:5] and [_digest(b.next_step()[0]) for _ in range(5)] == e0[:5]


def test_loader_refuses_resume_with_another_global_batch_or_seed(prepared_small):
    state = _loader(prepared_small).state_dict()
    with pytest.raises(ValueError, match="global_batch=128, this run has 64"):
        _loader(prepared_small, world=1, batch=64).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=5, this run has 6"):
        _loader(prepared_small, seed=6).load_state_dict(state)


def test_a_cursor_from_the_per_process_loader_carries_over_where_the_order_is_the_same(prepared_small):
    old = {"epoch": 0, "batches_in_epoch": 8, "seed": 5, "batch_size": 32, "world_size": 1, "num_workers": 0,
           "split": "train", "data_fingerprint": prepared_small.fingerprint}
    loader = _loader(prepared_small, world=1, workers=0)  # global batch 128 = 4 of the old micro-batches of 32
    loader.load_state_dict(old)
    straight = _loader(prepared_small, world=1, workers=0)
    _global_steps([straight], 2)
    assert np.array_equal(_global_steps([loader], 1)[0][1], _global_steps([straight], 1)[0][1])
    with pytest.raises(ValueError, match="world_size=2 and num_workers=0.*checkpoint.resume=never"):
        loader.load_state_dict({**old, "world_size": 2})
    with pytest.raises(ValueError, match="not fall as"):
        loader.load_state_dict({**old, "batches_in_epoch": 6})


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
    # read as a unit's pieces (prep's units by bytes), compressed ones too: the same documents
    import gzip

    for name in ("a.txt", "b.jsonl"):
        (tmp_path / f"z-{name}.gz").write_bytes(gzip.compress((tmp_path / name).read_bytes()))
    for pattern, field in (("*.txt", "text"), ("*.jsonl", "text"), ("*.parquet", "body"), ("z-*.txt.gz", "text"),
                           ("z-*.jsonl.gz", "text")):
        source = Source(SourceSpec(kind="files", splits={"train": str(tmp_path / pattern)}, text_field=field))
        pieces = [piece for unit in source.byte_units("train", 1 << 20) for piece in unit]
        assert [doc for piece in pieces for doc, _ in source.piece_documents("train", piece)] == \
            list(source.documents("train")), pattern


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


def mixed_corpus(folder: Path) -> SourceSpec:
    """One large one-document text file (CRLF and lone CR line ends, U+2028 inside lines), a JSONL of
    many documents, a gzipped JSONL (never cut) and an empty text file."""
    import gzip

    folder.mkdir()
    lines = [f"{STORIES[i % len(STORIES)]} ({i}) caf\u00e9\u2028{'x' * (i % 7)}" for i in range(600)]
    (folder / "a-book.txt").write_bytes("".join(line + ("\r\n" if i % 3 else "\r") for i, line in enumerate(lines)).encode())
    write_jsonl(folder / "b-docs.jsonl", [f"{s} {i}" for i, s in enumerate(STORIES * 10)])
    with gzip.open(folder / "c-more.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": s}) + "\n" for s in STORIES))
    (folder / "d-empty.txt").write_text("")
    write_jsonl(folder / "validation.jsonl", STORIES)
    return SourceSpec(kind="files", splits={"train": str(folder / "[abcd]-*"), "validation": str(folder / "validation.jsonl")})


def unit_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / ".units").glob("train-*.json"))]


def test_units_by_bytes_cut_large_files_at_line_ends_and_change_no_token(tmp_path, tokenizer_file):
    """Units of about unit_bytes: the one-document book is cut into several units, and the units'
    token streams hold exactly the tokens of the whole split (the same documents, the same count);
    2 workers write the same shards as 1."""
    spec = mixed_corpus(tmp_path / "corpus")
    whole = small_prep_config(source=spec, tokenizer=tokenizer_file, block_size=16, documents_per_unit=0,
                              unit_bytes=1 << 30)
    run_prep(whole, tmp_path / "one-unit", **QUIET)
    cut = dataclasses.replace(whole, unit_bytes=4000)
    for workers in (1, 2):
        run_prep(cut, tmp_path / f"cut-{workers}", workers=workers, **QUIET)
    one, many = unit_records(tmp_path / "one-unit"), unit_records(tmp_path / "cut-1")
    assert len(one) == 1 and len(many) > 10
    plan = json.loads((tmp_path / "cut-1" / "plan.json").read_text())
    book = [piece for unit in plan["pieces"]["train"] for piece in unit if piece[0].endswith("a-book.txt")]
    assert len(book) > 5 and all(piece[1] < piece[2] or piece[2] == -1 for piece in book)
    assert sum(r["tokens"] for r in many) == one[0]["tokens"]
    # every unit's shards are in the manifest, those of units inside the book (which end no document) too
    manifest = json.loads((tmp_path / "cut-1" / "manifest.json").read_text())["splits"]["train"]
    assert manifest["units"] == len(many) and any(r["documents"] == 0 for r in many)
    assert manifest["samples"] == sum(s["samples"] for r in many for s in r["shards"])
    assert sum(r["documents"] for r in many) == one[0]["documents"] == 1 + 300 + 30 + 1
    assert shard_hashes(tmp_path / "cut-1") == shard_hashes(tmp_path / "cut-2")


def test_a_unit_streams_through_a_worker_in_parts_and_shards_and_writes_the_same_bytes(tmp_path, tokenizer_file,
                                                                                       monkeypatch):
    """A worker reads a one-document text in parts of PART_LINES lines and writes each shard as soon
    as its samples are there: the shards equal those of one whole read, the samples across shards
    of 7 equal those of one shard per unit, and no part's tokens come near the book's."""
    from gam_pretrain.data import prep, sources

    def rows_and_records(out: Path):
        manifest = json.loads((out / "manifest.json").read_text())
        rows = [prep.read_checked_shard(out, shard, manifest) for shard in manifest["splits"]["train"]["shards"]]
        records = [{k: r[k] for k in ("documents", "tokens", "replaced_characters")} for r in unit_records(out)]
        return np.concatenate(rows), records

    spec = mixed_corpus(tmp_path / "corpus")
    cfg = small_prep_config(source=spec, tokenizer=tokenizer_file, block_size=16, documents_per_unit=0,
                            unit_bytes=1 << 30, samples_per_shard=7)
    monkeypatch.setattr(sources, "PART_LINES", 1 << 30)
    run_prep(cfg, tmp_path / "whole", **QUIET)
    run_prep(dataclasses.replace(cfg, samples_per_shard=1 << 20), tmp_path / "one-shard", **QUIET)
    parts, added = [], []
    monkeypatch.setattr(sources, "PART_LINES", 5)
    line_parts, add = sources._line_parts, prep._ShardWriter.add
    monkeypatch.setattr(sources, "_line_parts", lambda f, n: (parts.append(p) or p for p in line_parts(f, n)))
    monkeypatch.setattr(prep._ShardWriter, "add", lambda self, tokens: added.append(len(tokens)) or add(self, tokens))
    run_prep(cfg, tmp_path / "parts", **QUIET)
    assert len(parts) > 100  # the 600-line book came in parts
    assert len(shard_hashes(tmp_path / "parts")) > 20
    assert shard_hashes(tmp_path / "parts") == shard_hashes(tmp_path / "whole")
    rows, records = rows_and_records(tmp_path / "parts")
    one_rows, one_records = rows_and_records(tmp_path / "one-shard")
    assert len(list((tmp_path / "one-shard").glob("train-*.tar"))) == 1 and records == one_records
    np.testing.assert_array_equal(rows, one_rows)
    assert max(added) * 50 < records[0]["tokens"]  # tokens arrive a part at a time, never the book at once


def test_tokenizer_train_bytes_learns_from_the_first_bytes_only(tmp_path):
    text = " ".join(STORIES * 20)
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "first.txt").write_text(text.encode()[:3000].decode())
    write_jsonl(tmp_path / "validation.jsonl", STORIES)
    tokenizers = {}
    for name, train, limit in (("limited", "train.txt", 3000), ("first", "first.txt", 0), ("all", "train.txt", 0)):
        spec = SourceSpec(kind="files", splits={"train": str(tmp_path / train), "validation": str(tmp_path / "validation.jsonl")})
        cfg = small_prep_config(source=spec, tokenizer="bpe-whitespace", vocab_size=120, block_size=8,
                                tokenizer_train_bytes=limit)
        run_prep(cfg, tmp_path / name, **QUIET)
        tokenizers[name] = (tmp_path / name / "tokenizer.json").read_bytes()
    assert tokenizers["limited"] == tokenizers["first"] != tokenizers["all"]


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


# ---- trust: what reaches a model, and what a prep folder holds (issue 13) ---------------------------
def linked_copy(data: ShardSet, folder: Path, copied: tuple[str, ...] = ()) -> Path:
    """The prepared folder with its shards linked, except `copied` (a test may damage those)."""
    folder.mkdir()
    for path in data.path.iterdir():
        if path.suffix == ".tar" and path.name not in copied:
            (folder / path.name).symlink_to(path)
        elif path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


def keep_only_shards(data: Path, names: list[str]) -> None:
    """Shortens the copy's manifest to the named shards (a verify reads every shard listed)."""
    manifest = json.loads((data / "manifest.json").read_text())
    for info in manifest["splits"].values():
        info["shards"] = [s for s in info["shards"] if s["path"] in names]
    (data / "manifest.json").write_text(json.dumps(manifest))


def flip_token_bits(path: Path, samples: int = 50) -> None:
    """Flips the low bit of one token id in each of the first samples: the tar stays a valid tar."""
    import tarfile

    raw = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        members = tar.getmembers()[:samples]
    for m in members:
        raw[m.offset_data + m.size - 2] ^= 0x01  # the last token (little-endian uint16: its low byte)
    path.write_bytes(bytes(raw))


def test_corrupt_shard_never_reaches_the_model(prepared_small, tmp_path):
    first = _EpochOrder(prepared_small.shards("train"), seed=0, epoch=0).shards[0][1]
    validation = prepared_small.shards("validation")[0]
    data = linked_copy(prepared_small, tmp_path / "data", (first["path"], validation["path"]))
    flip_token_bits(data / first["path"])
    flip_token_bits(data / validation["path"])
    shards = ShardSet(data)
    assert len(shards.read(shards.shards("train")[-1])) > 0  # the other shards are fine
    with pytest.raises(PrepError, match=f"{data / first['path']}.*gam-pretrain verify {data}"):
        shards.read(first)
    loader = ShardLoader(shards, "train", 8, seed=0, num_workers=2)  # raised in a worker, re-raised as one line
    with pytest.raises(PrepError, match=first["path"]) as caught:
        loader.next_step()
    assert "\n" not in str(caught.value)
    with pytest.raises(PrepError, match=validation["path"]):
        list(validation_batches(shards, "validation", 8))


def test_out_of_vocabulary_id_is_refused_at_load(prepared_small, tmp_path):
    victim = prepared_small.shards("validation")[0]
    data = linked_copy(prepared_small, tmp_path / "data", (victim["path"],))
    raw = bytearray((data / victim["path"]).read_bytes())
    start = raw.index(b"\x93NUMPY")
    start += 10 + int.from_bytes(raw[start + 8 : start + 10], "little")  # the first sample's first token
    raw[start : start + 2] = (60000).to_bytes(2, "little")
    (data / victim["path"]).write_bytes(bytes(raw))
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["validation"]["shards"][0]["sha256"] = hashlib.sha256(raw).hexdigest()  # a buggy tool's shard
    (data / "manifest.json").write_text(json.dumps(manifest))
    keep_only_shards(data, [victim["path"]])
    with pytest.raises(PrepError, match=f"{victim['path']} holds token id 60000, outside the vocabulary of 512"):
        list(validation_batches(ShardSet(data), "validation", 8))
    with pytest.raises(PrepError, match=f"1 problem.*{victim['path']} holds token id 60000"):
        verify(data, log=lambda *a: None)


def without_split(prepared_small, folder: Path, split: str, empty: bool = False) -> Path:
    """A manifest (and tokenizer) of prepared_small lacking `split`, or with it empty."""
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((prepared_small.path / "tokenizer.json").read_bytes())
    manifest = json.loads(json.dumps(prepared_small.manifest))
    if empty:
        manifest["splits"][split].update(shards=[], samples=0, tokens=0)
    else:
        del manifest["splits"][split]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_training_data_without_validation_or_train_is_refused_before_any_step(prepared_small, tmp_path):
    from conftest import tiny_model_config
    from gam_pretrain.config import DataConfig
    from gam_pretrain.data.cache import open_training_data

    model = tiny_model_config(vocab_size=512, block_size=32)
    open_training_data(DataConfig(dir=str(prepared_small.path)), model, log=lambda *a: None)
    for split, empty, names in (("validation", False, "no 'validation' split .splits: train"),
                                ("validation", True, "no samples in its 'validation' split"),
                                ("train", False, "no 'train' split .splits: validation")):
        folder = without_split(prepared_small, tmp_path / f"{split}-{empty}", split, empty)
        with pytest.raises(ValueError, match=f"{folder} has {names}"):
            open_training_data(DataConfig(dir=str(folder)), model, log=lambda *a: None)


def stories_spec(tmp_path: Path, validation: str = "validation.jsonl") -> SourceSpec:
    if not (tmp_path / "train.jsonl").exists():
        write_jsonl(tmp_path / "train.jsonl", STORIES * 2)
        write_jsonl(tmp_path / "validation.jsonl", STORIES[:6])
        (tmp_path / "empty.jsonl").write_text("")
    return SourceSpec(kind="files", splits={"train": str(tmp_path / "train.jsonl"),
                                            "validation": str(tmp_path / validation)})


def stories_prep(tmp_path: Path, **overrides):
    base = dict(source=stories_spec(tmp_path), tokenizer="bpe-whitespace", vocab_size=200, block_size=8,
                documents_per_unit=20)
    return small_prep_config(**{**base, **overrides})


def test_a_failed_prep_leaves_nothing_and_the_corrected_rerun_runs(tmp_path):
    out = tmp_path / "out"
    failing = [stories_prep(tmp_path, source=stories_spec(tmp_path, "empty.jsonl")),
               stories_prep(tmp_path, source=stories_spec(tmp_path, "nope-*.jsonl")),
               stories_prep(tmp_path, block_size=0),
               stories_prep(tmp_path, tokenizer=str(tmp_path / "missing-tokenizer.json"))]
    for cfg in failing:
        with pytest.raises((PrepError, SourceError)):
            run_prep(cfg, out, **QUIET)
        assert not out.exists()
    manifest = run_prep(stories_prep(tmp_path), out, **QUIET)
    assert manifest["splits"]["validation"]["documents"] == 6


def test_a_prep_folder_whose_config_cannot_be_established_is_refused(tmp_path):
    out = tmp_path / "out"
    run_prep(stories_prep(tmp_path), out, **QUIET)
    finished = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".prep_config.json"}
    (out / ".prep_config.json").unlink()
    for record in (out / ".units").iterdir():
        record.unlink()
    for cfg in (stories_prep(tmp_path, vocab_size=250), stories_prep(tmp_path)):
        with pytest.raises(PrepError, match=f"{out} holds prep files .* cannot be established; use another --out"):
            run_prep(cfg, out, **QUIET)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == finished


def cache_folder(tmp_path: Path, tokenizer) -> Path:
    from conftest import tiny_model_config
    from gam_pretrain.config import DataConfig
    from gam_pretrain.data.cache import recipe_prep

    data_cfg = DataConfig(recipe="embedded", tokenizer=str(tokenizer), cache_dir=str(tmp_path / "cache"))
    return recipe_prep(data_cfg, tiny_model_config(vocab_size=512, block_size=32))[1]


def test_a_changed_tokenizer_file_is_another_prep(tmp_path, tokenizer_file):
    from gam_pretrain.data.prep import plan_prep, run_units
    from gam_pretrain.data.tokenizer import train_bpe

    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_bytes(Path(tokenizer_file).read_bytes())
    out = tmp_path / "out"
    run_prep(stories_prep(tmp_path, tokenizer=str(tokenizer)), out, **QUIET)
    finished = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    cached_before = cache_folder(tmp_path, tokenizer)
    other = train_bpe(STORIES, 300, "bpe-bytelevel")
    tokenizer.write_text(other.to_str())  # the same path, another tokenizer
    with pytest.raises(PrepError, match=f"{out} holds a prep with a different configuration .differs in the content "
                                        "of the tokenizer file"):
        run_prep(stories_prep(tmp_path, tokenizer=str(tokenizer)), out, **QUIET)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == finished
    # a run's recipe prep with that tokenizer lives in another cache folder than before the change
    assert cache_folder(tmp_path, tokenizer) != cached_before
    # a tokenizer.json swapped inside a planned folder: the units phase refuses to mix two tokenizers
    planned = tmp_path / "planned"
    plan_prep(stories_prep(tmp_path), planned, log=lambda *a: None)
    (planned / "tokenizer.json").write_text(other.to_str())
    with pytest.raises(PrepError, match=f"{planned / 'tokenizer.json'} is missing or not the tokenizer this prep"):
        run_units(planned)


def test_prep_config_values_are_refused_by_key_before_anything_is_written(tmp_path):
    for key, value in (("vocab_size", 0), ("vocab_size", -5), ("block_size", 0), ("block_size", -1),
                       ("documents_per_unit", -1), ("unit_bytes", 0), ("samples_per_shard", 0),
                       ("tokenizer_train_documents", -1), ("tokenizer_train_bytes", -1)):
        with pytest.raises(PrepError, match=rf"^prep\.{key} must be .*got {value}$"):
            run_prep(stories_prep(tmp_path, **{key: value}), tmp_path / "out", **QUIET)
        assert not (tmp_path / "out").exists()


def test_bad_corpus_files_are_named_by_file_and_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def first_error(path: Path, **spec) -> str:
        with pytest.raises(SourceError) as caught:
            list(Source(SourceSpec(kind="files", splits={"train": str(path)}, **spec)).documents("train"))
        assert "\n" not in str(caught.value)
        return str(caught.value)

    jsonl = tmp_path / "c.jsonl"
    for line, says in (('{"text": 5}', "field 'text' is 5 .int., not text"),
                       ('{"text": null}', "field 'text' is null .NoneType., not text"),
                       ('{"text": "broken', "not valid JSON"), ('["text"]', "a JSON list, not an object"),
                       ('{"body": "x"}', "no field 'text' .fields: body.")):
        jsonl.write_text('{"text": "fine"}\n\n' + line + "\n")
        assert re.search(f"^{jsonl}:3: {says}", first_error(jsonl)), line
    garbled = tmp_path / "c.json"
    garbled.write_text('[{"text": "a"')
    assert first_error(garbled).startswith(f"{garbled}:1: not valid JSON")
    pq.write_table(pa.table({"body": ["one", "two"]}), tmp_path / "c.parquet")
    assert first_error(tmp_path / "c.parquet") == (f"{tmp_path / 'c.parquet'}: no column 'text' (columns: body); "
                                                   "set prep.source.text_field")
    pq.write_table(pa.table({"text": ["one", None]}), tmp_path / "n.parquet")
    assert first_error(tmp_path / "n.parquet").startswith(f"{tmp_path / 'n.parquet'}: row 1: field 'text' is null")
    (tmp_path / "g.parquet").write_bytes(b"not a parquet file at all")
    assert first_error(tmp_path / "g.parquet").startswith(f"cannot read {tmp_path / 'g.parquet'} as parquet")
    # through `datasets` (the hf builders) the file is named too
    hf = Source(SourceSpec(kind="hf", path="json", data_files={"train": [str(garbled)]}))
    with pytest.raises(SourceError, match=f"^cannot read dataset 'json' from {garbled}: "):
        list(hf.documents("train"))


def test_hub_recipe_without_network_is_one_line_naming_the_dataset(tmp_path):
    from gam_pretrain.data.recipes import load_recipe

    recipe = load_recipe("wikitext2")  # a Hub recipe; conftest sets HF_DATASETS_OFFLINE / HF_HUB_OFFLINE
    recipe.source.path = "gam-pretrain-tests/never-downloaded"  # wikitext itself may be in this machine's cache
    with pytest.raises(SourceError, match="^cannot load dataset 'gam-pretrain-tests/never-downloaded' .config "
                                          "wikitext-2-raw-v1.: the Hugging Face Hub could not be reached") as caught:
        run_prep(recipe, tmp_path / "out", **QUIET)
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()


def test_verify_logs_every_problem_and_fails_in_one_line(prepared_small, tmp_path):
    victims = [s["path"] for s in prepared_small.shards("validation")[:1] + prepared_small.shards("train")[:1]]
    data = linked_copy(prepared_small, tmp_path / "data", tuple(victims))
    for victim in victims:
        flip_token_bits(data / victim, samples=1)
    keep_only_shards(data, victims + [prepared_small.shards("train")[1]["path"]])
    logged = []
    with pytest.raises(PrepError) as caught:
        verify(data, log=logged.append)
    assert str(caught.value).startswith(f"verify failed for {data}: 2 problem(s); first: shard {data / victims[1]}")
    assert "\n" not in str(caught.value)
    assert [line for line in logged if line.startswith("problem:")] == [
        f"problem: shard {data / v} does not match the manifest's sha256 (corrupt, truncated or changed); "
        f"run `gam-pretrain verify {data}`" for v in (victims[1], victims[0])]


def test_garbled_manifest_and_tokenizer_are_named(prepared_small, tmp_path):
    from gam_pretrain.data import load_tokenizer

    data = linked_copy(prepared_small, tmp_path / "data")
    for text in ('{"format": "gam-pretrain-shards", "splits": {', "[1, 2]", '{"format": "gam-pretrain-shards"}'):
        (data / "manifest.json").write_text(text)
        with pytest.raises(PrepError, match=f"^{data / 'manifest.json'} ") as caught:
            ShardSet(data)
        assert "\n" not in str(caught.value)
    (data / "manifest.json").write_bytes((prepared_small.path / "manifest.json").read_bytes())
    (data / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(PrepError, match=f"^{data / 'tokenizer.json'} does not match the manifest's sha256"):
        ShardSet(data).tokenizer()
    with pytest.raises(ValueError, match=f"^{data / 'tokenizer.json'} is not a tokenizers JSON file"):
        load_tokenizer(data / "tokenizer.json")


# ---- the paper's data pipeline: packing, tokenizer splits, bpe-paper, exclude, prep identity ---------
PAPER_KEYS = ("packing", "tokenizer_splits")  # PrepConfig fields added with the paper's packing
PAPER_SOURCE_KEYS = ("exclude", "missing_hint")  # SourceSpec fields added with the linux_doc recipe
BYTES_KEYS = ("unit_bytes", "tokenizer_train_bytes")  # PrepConfig fields added with units by bytes


def unique_stories_spec(folder: Path, validation=STORIES[:6], extra: dict | None = None) -> SourceSpec:
    """A files corpus: STORIES once each as train, `validation` as validation, plus the `extra` splits."""
    folder.mkdir(exist_ok=True)
    write_jsonl(folder / "train.jsonl", STORIES)
    write_jsonl(folder / "validation.jsonl", validation)
    splits = {"train": str(folder / "train.jsonl"), "validation": str(folder / "validation.jsonl")}
    return SourceSpec(kind="files", splits={**splits, **(extra or {})})


def paper_prep(tmp_path: Path, **overrides):
    """block 7: chunks of 8 tokens; 7 documents per unit and 4 samples per shard, which paper packing ignores."""
    if "source" not in overrides:
        overrides["source"] = unique_stories_spec(tmp_path / "corpus")
    base = dict(tokenizer="bpe-whitespace", vocab_size=200, block_size=7, documents_per_unit=7, samples_per_shard=4,
                packing="paper")
    return small_prep_config(**{**base, **overrides})


def old_identity(cfg) -> dict:
    """The prep config as the code before `packing`, `tokenizer_splits` and units by bytes recorded it."""
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))
    for key in PAPER_KEYS + BYTES_KEYS:
        del d[key]
    for key in PAPER_SOURCE_KEYS:
        del d["source"][key]
    return d


def test_paper_packing_is_the_non_overlapping_chunks_of_each_whole_split(tmp_path):
    out = tmp_path / "paper"
    manifest = run_prep(paper_prep(tmp_path), out, **QUIET)
    data = ShardSet(out)
    tok = data.tokenizer()
    for split, docs in (("train", STORIES), ("validation", STORIES[:6])):
        ids = [i for doc in docs for i in tok.encode(doc, add_special_tokens=False).ids]  # no separators
        n = len(ids) // 8
        assert len(ids) % 8, f"{split}: pick a corpus whose stream leaves a remainder to drop"
        info = manifest["splits"][split]
        assert len(info["shards"]) == 1 and info["units"] == 1 and info["documents"] == len(docs)
        assert info["samples"] == info["shards"][0]["samples"] == n and info["tokens"] == n * 8
        assert data.read(info["shards"][0]).tolist() == np.asarray(ids[: n * 8]).reshape(n, 8).tolist()
    assert manifest["prep"]["packing"] == "paper"
    verify(out, log=lambda *a: None)
    # separators packing of the same corpus: an <eos> after each document, windows overlapping by one token
    sep = run_prep(paper_prep(tmp_path, packing="separators"), tmp_path / "separators", **QUIET)
    separated = ShardSet(tmp_path / "separators")
    eos = separated.tokenizer().token_to_id("<eos>")
    rows = np.concatenate([separated.read(s) for s in sep["splits"]["train"]["shards"]])
    assert (rows == eos).any() and not (data.read(manifest["splits"]["train"]["shards"][0]) == eos).any()
    first = separated.read(sep["splits"]["train"]["shards"][0])
    assert (first[1:, 0] == first[:-1, -1]).all() and len(sep["splits"]["train"]["shards"]) > 1


def test_loader_serves_a_paper_packed_split_as_a_shuffle_of_its_chunks(tmp_path):
    from collections import Counter

    numbers = [" ".join(str(n) for n in range(i, i + 10)) for i in range(0, 300, 10)]  # each number one token
    spec = unique_stories_spec(tmp_path / "corpus", validation=numbers[:3])
    write_jsonl(tmp_path / "corpus" / "train.jsonl", numbers)
    run_prep(paper_prep(tmp_path, source=spec, vocab_size=500), tmp_path / "paper", **QUIET)
    data = ShardSet(tmp_path / "paper")
    (shard,) = data.shards("train")
    chunks = [tuple(row) for row in data.read(shard)]
    index = {row: i for i, row in enumerate(chunks)}
    assert len(index) == len(chunks) == 300 // 8  # every chunk tells which one it is
    orders = []
    for seed in (3, 4):
        loader = ShardLoader(data, "train", 8, seed=seed, num_workers=0)
        served = []
        for _ in range(loader.steps_per_epoch):
            ((x, y),) = loader.next_step()
            served += [tuple(r) for r in np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1).astype(np.uint16)]
        assert not Counter(served) - Counter(chunks)  # only chunks of the split, none twice
        assert len(served) == len(chunks) // 8 * 8
        order = [index[row] for row in served]
        assert order != sorted(order) and min(order[:8]) < len(chunks) // 2 <= max(order[:8])  # drawn from all of it
        orders.append(order)
    assert orders[0] != orders[1]


def test_tokenizer_splits_decide_what_a_trained_tokenizer_learns(tmp_path):
    """"honeyfish" is only in the validation text; at vocab 300 BPE runs out of merges (every word
    of the corpus becomes one token), so the tokenizer learns it exactly when it reads validation."""
    spec = unique_stories_spec(tmp_path / "corpus", validation=["A honeyfish swam by."] * 3)
    learned = {}
    for splits in (["train"], ["train", "validation"]):
        out = tmp_path / "-".join(splits)
        manifest = run_prep(paper_prep(tmp_path, source=spec, vocab_size=300, tokenizer_splits=splits), out, **QUIET)
        tok = ShardSet(out).tokenizer()
        assert tok.get_vocab_size() < 300  # saturated: a larger vocabulary would learn nothing more
        learned[len(splits)] = tok.encode("honeyfish", add_special_tokens=False).ids
    assert len(learned[1]) > 1 and len(learned[2]) == 1
    assert learned[2][0] in ShardSet(tmp_path / "train-validation").read(manifest["splits"]["validation"]["shards"][0])
    # [all]: every split the source defines (here train and validation, in that order)
    run_prep(paper_prep(tmp_path, source=spec, vocab_size=300, tokenizer_splits=["all"]), tmp_path / "all", **QUIET)
    assert (tmp_path / "all" / "tokenizer.json").read_bytes() == (tmp_path / "train-validation" / "tokenizer.json").read_bytes()
    # a split the tokenizer would learn from that the source lacks, or that is empty: one line, nothing written
    (tmp_path / "corpus" / "empty.jsonl").write_text("")
    with_empty = unique_stories_spec(tmp_path / "corpus", extra={"test": str(tmp_path / "corpus" / "empty.jsonl")})
    for splits, error, says in (
            (["train", "test"], "missing", "prep.tokenizer_splits names split 'test', which the corpus does not have"),
            (["train", "test"], PrepError, "split 'test' of the corpus .in prep.tokenizer_splits. is empty"),
            (["train", "train"], PrepError, "prep.tokenizer_splits names a split twice"),
            (["all", "train"], PrepError, r"prep.tokenizer_splits: \[all\] stands alone"),
            ([], PrepError, "prep.tokenizer_splits must name the splits")):
        source = spec if error == "missing" else with_empty
        with pytest.raises(PrepError, match=says) as caught:
            run_prep(paper_prep(tmp_path, source=source, tokenizer_splits=splits), tmp_path / "out", **QUIET)
        assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()


def test_bpe_paper_tokenizer_has_the_papers_special_tokens_as_ids_0_to_3(tmp_path):
    from gam_pretrain.data import train_bpe

    tok = train_bpe(STORIES, 200, "bpe-paper")
    assert [tok.token_to_id(t) for t in ("[UNK]", "[PAD]", "[SOS]", "[EOS]")] == [0, 1, 2, 3]
    assert tok.token_to_id("<eos>") is None and tok.encode("cat \u00e9", add_special_tokens=False).ids[-1] == 0
    # separators packing puts its [EOS] between documents; paper packing puts none
    for packing, has_eos in (("separators", True), ("paper", False)):
        out = tmp_path / packing
        manifest = run_prep(paper_prep(tmp_path, tokenizer="bpe-paper", packing=packing), out, **QUIET)
        assert manifest["tokenizer"]["kind"] == "bpe-paper"
        assert ShardSet(out).tokenizer().token_to_id("[EOS]") == 3
        rows = np.concatenate([ShardSet(out).read(s) for s in manifest["splits"]["train"]["shards"]])
        assert (rows == 3).any() == has_eos


def test_excluded_files_are_left_out_of_their_split_only(tmp_path):
    docs = tmp_path / "docs"
    (docs / "val").mkdir(parents=True)
    for name in ("a", "b", "c", "val/v"):
        (docs / f"{name}.txt").write_text(f"document {name}")
    splits = {"train": str(docs / "**" / "*.txt"), "validation": str(docs / "val" / "*.txt")}
    spec = SourceSpec(kind="files", splits=splits, exclude={"train": [str(docs / "val" / "**" / "*.txt"), str(docs / "b.txt")]})
    assert list(Source(spec).documents("train")) == ["document a", "document c"]
    assert list(Source(spec).documents("validation")) == ["document val/v"]
    assert Source(spec).fingerprint(["train"]) != Source(SourceSpec(kind="files", splits=splits)).fingerprint(["train"])
    everything = SourceSpec(kind="files", splits=splits, exclude={"train": [str(docs / "*.txt"), str(docs / "val" / "*")]})
    with pytest.raises(SourceError, match="^split 'train': every file its globs match is excluded$"):
        list(Source(everything).documents("train"))
    assert list(Source(everything).documents("validation")) == ["document val/v"]


def test_linux_doc_recipe_without_its_package_is_one_line_naming_apt_get(tmp_path):
    from gam_pretrain.data.recipes import load_recipe
    from gam_pretrain.data.recipes.linux_doc import DOCS

    recipe = load_recipe("linux_doc")  # the package may be installed here: point its globs at a folder that is not
    absent = str(tmp_path / "absent" / "Documentation")
    spec = recipe.source
    spec.splits = {split: pattern.replace(DOCS, absent) for split, pattern in spec.splits.items()}
    spec.exclude = {split: [p.replace(DOCS, absent) for p in patterns] for split, patterns in spec.exclude.items()}
    assert all(absent in p for p in spec.splits.values()) and DOCS not in json.dumps(spec.exclude)
    with pytest.raises(SourceError, match=r"^split 'train': no file matches .*absent.*; install the corpus with "
                                          r"`apt-get install linux-doc-6\.1`") as caught:
        run_prep(recipe, tmp_path / "out", **QUIET)
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()


def test_prep_identity_leaves_out_the_new_fields_at_their_old_values(tmp_path):
    import dataclasses

    from conftest import tiny_model_config
    from gam_pretrain.config import DataConfig
    from gam_pretrain.data.cache import recipe_prep
    from gam_pretrain.data.prep import prep_identity
    from gam_pretrain.data.recipes import load_recipe, recipe_names

    new_recipes = {"linux_doc"}  # made with exclude / missing_hint: no prep of theirs predates them
    assert new_recipes < set(recipe_names())
    for name in recipe_names():
        recipe = load_recipe(name)
        identity = prep_identity(recipe)
        assert not set(PAPER_KEYS) & identity.keys(), name
        if name in new_recipes:
            # exclude changes the documents; the install hint does not, so it is no part of the identity
            assert identity["source"]["exclude"] == recipe.source.exclude and "missing_hint" not in identity["source"]
            continue
        assert not set(PAPER_SOURCE_KEYS) & identity["source"].keys(), name
        assert identity == old_identity(recipe), name
        paper = prep_identity(dataclasses.replace(recipe, packing="paper", tokenizer_splits=["train", "validation"]))
        assert (paper["packing"], paper["tokenizer_splits"]) == ("paper", ["train", "validation"])
    # a prep of Hugging Face rows at the default (units of 1000 documents, as before units by bytes)
    hub = prep_identity(PrepConfig(source=SourceSpec(kind="hf", path="roneneldan/TinyStories")))
    assert hub["documents_per_unit"] == 1000 and "unit_bytes" not in hub
    # the cache folder the code before this change gave the embedded recipe at vocab 512, block 32
    data_cfg = DataConfig(recipe="embedded", cache_dir=str(tmp_path))
    assert recipe_prep(data_cfg, tiny_model_config(vocab_size=512, block_size=32))[1].name == "embedded-8e42498ca5d2"


def test_a_prep_folder_recorded_before_packing_existed_is_resumed_and_a_new_packing_refused(tmp_path):
    cfg = paper_prep(tmp_path, packing="separators")
    out = tmp_path / "out"
    manifest = run_prep(cfg, out, **QUIET)
    assert json.loads((out / ".prep_config.json").read_text()) == old_identity(cfg) == manifest["prep"]
    (out / ".prep_config.json").write_text(json.dumps(old_identity(cfg), indent=1))  # as the old code wrote it
    finished = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "prep_stats.json"}
    run_prep(cfg, out, **QUIET)  # accepted: the same prep
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "prep_stats.json"} == finished
    for changed, key in (({"packing": "paper"}, "packing"), ({"tokenizer_splits": ["train", "validation"]}, "tokenizer_splits")):
        with pytest.raises(PrepError, match=f"^{re.escape(str(out))} holds a prep with a different configuration "
                                            rf"\(differs in prep\.{key}\); use another --out$"):
            run_prep(paper_prep(tmp_path, **{"packing": "separators", **changed}), out, **QUIET)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "prep_stats.json"} == finished


def test_recipe_prep_with_paper_packing_is_another_cache_folder_and_its_command_names_it(tmp_path):
    import shlex

    from conftest import tiny_model_config
    from gam_pretrain.config import DataConfig, PrepCommand, load_prep_command
    from gam_pretrain.data.cache import DataMissingError, check_data_available, prep_command, recipe_prep

    model = tiny_model_config(vocab_size=512, block_size=32)
    cache = str(tmp_path / "cache")
    runs = {"default": DataConfig(recipe="embedded", cache_dir=cache),
            "paper": DataConfig(recipe="embedded", cache_dir=cache, packing="paper", tokenizer_splits=["train", "validation"]),
            "packing": DataConfig(recipe="embedded", cache_dir=cache, packing="paper"),
            "splits": DataConfig(recipe="embedded", cache_dir=cache, tokenizer_splits=["train", "validation"])}
    preps = {name: recipe_prep(data_cfg, model) for name, data_cfg in runs.items()}
    assert len({folder for _, folder in preps.values()}) == 4
    paper_cfg, paper_dir = preps["paper"]
    assert (paper_cfg.packing, paper_cfg.tokenizer_splits) == ("paper", ["train", "validation"])
    command = prep_command("embedded", paper_cfg, paper_dir)
    assert "--prep.packing paper" in command and "--prep.tokenizer_splits" in command
    default = prep_command("embedded", *preps["default"])
    assert "--prep.packing" not in default and "--prep.tokenizer_splits" not in default
    # the command, run, would write that very prep into that folder
    words = shlex.split(command)
    assert words[:3] == ["gam-pretrain", "prep", "embedded"]
    parsed = load_prep_command(PrepCommand, None, ["--recipe", *words[2:]])
    assert parsed.prep == paper_cfg and parsed.out == str(paper_dir)
    with pytest.raises(DataMissingError, match="--prep.packing paper"):
        check_data_available(runs["paper"], model)


def test_source_fingerprint_of_a_spec_without_the_new_fields_is_unchanged(tmp_path):
    import dataclasses

    spec = unique_stories_spec(tmp_path / "corpus")
    old = hashlib.sha256(json.dumps({k: v for k, v in dataclasses.asdict(spec).items() if k not in PAPER_SOURCE_KEYS},
                                    sort_keys=True, default=str).encode())
    for split in ("train", "validation"):  # as the code before exclude / missing_hint computed it
        path = Path(spec.splits[split])
        old.update(path.name.encode())
        old.update(path.read_bytes())
    assert Source(spec).fingerprint(["train", "validation"]) == old.hexdigest()


def test_exclude_spelt_like_the_split_glob_with_dot_slash_excludes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("d").mkdir()
    Path("d/a.txt").write_text("a")
    Path("d/b.txt").write_text("b")
    spec = SourceSpec(kind="files", splits={"train": "./d/*.txt"}, exclude={"train": ["./d/b.txt"]})
    assert list(Source(spec).documents("train")) == ["a"]


def test_inspect_prints_the_summary_samples_and_token_counts_per_split(prepared_small):
    from gam_pretrain.data.inspect import inspect_shards

    lines = []
    report = inspect_shards(prepared_small.path, samples=2, max_shards=1, log=lines.append)
    text = "\n".join(lines)
    assert "shard format 2, block 32" in text
    assert f"train: {len(prepared_small.shards('train'))} shards" in text and "validation: " in text
    assert sum("sample" in line and ".tar" in line for line in lines) == 4  # 2 per split, decoded
    for split in ("train", "validation"):
        assert sum(report[split]["histogram"].values()) == prepared_small.vocab_size
        assert report[split]["distinct_ids"] == prepared_small.vocab_size - report[split]["histogram"]["0"]
