"""`gam-pretrain inspect DIR`: what a user looks at first in a shard set (the manifest's summary, a
few samples decoded, and per split how often token ids occur), reading at most a few shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .shards import ShardSet

# bins of how many times a token id occurs (the last one open-ended)
COUNT_BINS = (0, 1, 10, 100, 1_000, 10_000, 100_000)


def count_histogram(token_counts: np.ndarray) -> dict[str, int]:
    """Token ids per bin of occurrence count: {"0": ids never seen, "1-9": ..., ">=100000": ...}."""
    histogram = {}
    for low, high in zip(COUNT_BINS, COUNT_BINS[1:] + (None,)):
        if low == 0:
            label, ids = "0", int((token_counts == 0).sum())
        elif high is None:
            label, ids = f">={low}", int((token_counts >= low).sum())
        else:
            label, ids = f"{low}-{high - 1}", int(((token_counts >= low) & (token_counts < high)).sum())
        histogram[label] = ids
    return histogram


def inspect_shards(path: str | Path, samples: int = 2, max_shards: int = 4, log=print) -> dict:
    shard_set = ShardSet(path)
    manifest = shard_set.manifest
    tokenizer = shard_set.tokenizer()
    vocab = manifest["tokenizer"]["vocab_size"]
    itemsize = np.dtype(manifest["dtype"]).itemsize
    log(f"{shard_set.path}: shard format {manifest['format_version']}, block {manifest['block_size']} "
        f"({manifest['sample_length']} ids per sample, {manifest['dtype']}), tokenizer "
        f"{manifest['tokenizer'].get('kind', 'file')} with {vocab:,} tokens")
    report = {}
    for split, info in manifest["splits"].items():
        shards = info["shards"]
        log(f"{split}: {len(shards)} shards, {info['samples']:,} samples, {info['tokens']:,} tokens "
            f"({info['tokens'] * itemsize / 1e6:,.1f} MB of ids) from {info.get('documents', 0):,} documents "
            f"in {info.get('units', 0)} units")
        counts = np.zeros(vocab, dtype=np.int64)
        shown = 0
        read = shards[:max_shards]
        for shard in read:
            rows = shard_set.read(shard)
            counts += np.bincount(rows.ravel(), minlength=vocab)
            for row in rows[: max(0, samples - shown)]:
                text = tokenizer.decode(row.tolist(), skip_special_tokens=False).replace("\n", "\\n")
                log(f"  sample {shown} ({shard['path']}): {text[:160]!r}{'...' if len(text) > 160 else ''}")
                shown += 1
        histogram = count_histogram(counts)
        top = np.argsort(-counts, kind="stable")[:8]
        log(f"  token ids by occurrences in {len(read)} of {len(shards)} shards: "
            + ", ".join(f"{label}: {ids:,}" for label, ids in histogram.items()))
        log("  most frequent: " + ", ".join(f"{tokenizer.id_to_token(int(i))!r} {counts[i] / max(counts.sum(), 1):.1%}"
                                            for i in top if counts[i]))
        report[split] = {"shards_read": len(read), "histogram": histogram, "distinct_ids": int((counts > 0).sum())}
    return report
