"""TinyStories, capped as in the paper: 50,000 train and 5,000 validation stories."""
from ..prep import PrepConfig
from ..sources import SourceSpec

RECIPE = PrepConfig(
    source=SourceSpec(kind="hf", path="roneneldan/TinyStories", splits={"train": "train", "validation": "validation"},
                      max_documents={"train": 50000, "validation": 5000}),
    tokenizer="bpe-whitespace",
    vocab_size=10000,
    block_size=256,
    documents_per_unit=5000,
    samples_per_shard=2048,
)
