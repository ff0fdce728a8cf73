"""WikiText-2 (raw), as in the paper's Table 1.

WikiText's rows are single lines (headings, paragraphs, blank lines), each one document. With the
recipe's defaults (the fair recipe) each is followed by <eos> and the stream is cut into windows
overlapping by one token, and the 10k BPE learns from the train split; configs/paper/wikitext2.yaml
sets the paper's choices instead (rows joined without separators into non-overlapping chunks, the
BPE trained on all three splits; see gam_pretrain/data/prep.py).
"""
from ..prep import PrepConfig
from ..sources import SourceSpec

RECIPE = PrepConfig(
    source=SourceSpec(kind="hf", path="wikitext", name="wikitext-2-raw-v1",
                      splits={"train": "train", "validation": "validation", "test": "test"}),
    splits=["train", "validation", "test"],
    tokenizer="bpe-whitespace",
    vocab_size=10000,
    block_size=256,
    documents_per_unit=20000,
    samples_per_shard=2048,
)
