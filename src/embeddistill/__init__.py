"""embeddistill: distil large retrieval models into small, fast students (EmbedDistill, arXiv 2301.12005)."""

__version__ = "0.1.0"
