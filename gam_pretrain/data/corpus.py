"""The embedded corpus shipped with the package (see corpus/PROVENANCE.md)."""
from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "corpus"
