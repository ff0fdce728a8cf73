"""The same corpus prepped in separate processes, at 1 and 2 workers, gives byte-identical
tokenizer.json, shards and manifest, for every trained tokenizer kind (bpe-paper too).

Separate processes matter: with an end-of-word suffix, `tokenizers` numbered the suffixed tokens
in the order of a randomly seeded hash map (huggingface/tokenizers#1794), and a test inside one
process could miss a difference that only a new process shows. On that code each of the 6
bpe-whitespace preps of this corpus gave its own tokenizer.json (and the merges differed too).
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from gam_pretrain.data.prep import TRAINED_TOKENIZERS
from gam_pretrain.data.sources import _embedded_documents

REPO = Path(__file__).resolve().parent.parent
KINDS = TRAINED_TOKENIZERS  # bpe-whitespace, bpe-bytelevel, bpe-paper
PREP = r"""
import sys
from pathlib import Path
from gam_pretrain.data import PrepConfig, SourceSpec, run_prep

corpus, out = Path(sys.argv[1]), Path(sys.argv[2])
spec = SourceSpec(kind="files", splits={s: str(corpus / f"{s}.jsonl") for s in ("train", "validation")})
for kind in sys.argv[3:]:
    for workers in (1, 2):
        cfg = PrepConfig(source=spec, tokenizer=kind, vocab_size=400, block_size=16, documents_per_unit=10,
                         samples_per_shard=64)
        run_prep(cfg, out / f"{kind}-{workers}", workers=workers, log=lambda *a: None, progress=False)
"""


def write_corpus(folder: Path, lines_per_document: int = 10) -> None:
    """17 KB of the embedded Shakespeare (480 lines): 40 train and 8 validation documents."""
    lines = [line for line in _embedded_documents("train")[0].splitlines() if line.strip()]
    docs = ["\n".join(lines[i : i + lines_per_document]) for i in range(0, 48 * lines_per_document, lines_per_document)]
    folder.mkdir()
    for split, part in (("train", docs[:40]), ("validation", docs[40:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tokenizer_and_shards_identical_across_processes_and_workers(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    runs = [subprocess.Popen([sys.executable, "-c", PREP, str(corpus), str(tmp_path / f"run{i}"), *KINDS],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(3)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
    for kind in KINDS:
        folders = [tmp_path / f"run{i}" / f"{kind}-{workers}" for i in range(3) for workers in (1, 2)]
        tokenizers = {sha(f / "tokenizer.json") for f in folders}
        manifests = {sha(f / "manifest.json") for f in folders}  # every shard's sha256, the tokenizer's too
        assert len(tokenizers) == 1, f"{kind}: {len(tokenizers)} different tokenizer.json in 3 processes x 2 worker counts"
        assert len(manifests) == 1, f"{kind}: {len(manifests)} different manifests"
        shards = {f.name: sha(f) for f in sorted(folders[0].glob("*.tar"))}
        assert len(shards) > 2 and all({f.name: sha(f) for f in sorted(d.glob("*.tar"))} == shards for d in folders)
