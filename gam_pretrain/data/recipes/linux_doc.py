"""A WikiText-2-sized stand-in of real English, prepped from a package that Debian ships: the Linux
kernel's documentation as reStructuredText (`apt-get install linux-doc-6.1`, Debian 12 bookworm;
/usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz).

Why: WikiText-2 and TinyStories need the Hugging Face Hub, and the 1 MB embedded corpus is too small
to tell the paper's models apart. This is technical English prose (with reST markup, code and tables)
of WikiText-2's size: about 2.5M words of train text. Provenance and licence: the kernel's
Documentation/ tree, GPL-2.0 (a few files under GPL-compatible or CC-BY-4.0 / GFDL terms, as their
SPDX headers say); Debian package linux-doc-6.1 (6.1.176-1 when the tables were made). Nothing of
it is committed here: prep reads the installed package. Another package version gives another
corpus (the prep's manifest records every shard's hash).

Splits by folder, so that no file is in two: validation = filesystems/ (about 225k words), test =
userspace-api/ (about 263k words), train = every other folder except translations/ (non-English).
One document per file; work units of 16 MiB of text (prep.unit_bytes).
"""
from ..prep import PrepConfig
from ..sources import SourceSpec

DOCS = "/usr/share/doc/linux-doc-6.1/Documentation"
VALIDATION, TEST, NOT_ENGLISH = f"{DOCS}/filesystems/**/*.rst.gz", f"{DOCS}/userspace-api/**/*.rst.gz", f"{DOCS}/translations/**/*.rst.gz"

RECIPE = PrepConfig(
    source=SourceSpec(kind="files", splits={"train": f"{DOCS}/**/*.rst.gz", "validation": VALIDATION, "test": TEST},
                      exclude={"train": [VALIDATION, TEST, NOT_ENGLISH]},
                      missing_hint="install the corpus with `apt-get install linux-doc-6.1` (Debian 12)"),
    splits=["train", "validation", "test"],
    tokenizer="bpe-whitespace",
    vocab_size=10000,
    block_size=256,
    samples_per_shard=2048,
)
