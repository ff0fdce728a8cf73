"""WikiText-2 (raw), as in the paper's Table 1.

WikiText's rows are single lines (headings, paragraphs, blank lines). Like the paper, the lines
are concatenated (each row is one "document" followed by <eos>, so line breaks become <eos>
tokens) and the token stream is cut into blocks. The paper trained its 10k BPE on all splits;
here it sees only the train split.
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
