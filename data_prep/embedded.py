"""The embedded Shakespeare corpus (gam_pretrain/corpus/PROVENANCE.md): works/plays as documents."""
from gam_pretrain.data.prep import PrepConfig
from gam_pretrain.data.sources import SourceSpec

RECIPE = PrepConfig(
    source=SourceSpec(kind="embedded"),
    tokenizer="bpe-bytelevel",
    vocab_size=4096,
    block_size=128,
    documents_per_unit=4,  # 39 long plays -> 10 train units, enough for parallel workers
    samples_per_shard=1024,
)
