"""The embedded Shakespeare corpus (gam_pretrain/corpus/PROVENANCE.md): works/plays as documents."""
from ..prep import PrepConfig
from ..sources import SourceSpec

RECIPE = PrepConfig(
    source=SourceSpec(kind="embedded"),
    tokenizer="bpe-bytelevel",
    vocab_size=4096,
    block_size=128,
    documents_per_unit=4,  # 39 long plays -> 10 train units, enough for parallel workers
    samples_per_shard=1024,
)
