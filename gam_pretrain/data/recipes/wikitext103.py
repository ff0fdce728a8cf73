"""WikiText-103 (raw): same handling as wikitext2, 50x larger."""
import dataclasses

from ..sources import SourceSpec

from .wikitext2 import RECIPE as _WT2

RECIPE = dataclasses.replace(
    _WT2,
    source=SourceSpec(kind="hf", path="wikitext", name="wikitext-103-raw-v1",
                      splits={"train": "train", "validation": "validation", "test": "test"}),
    documents_per_unit=100000,
)
