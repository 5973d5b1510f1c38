"""Stats stage: second moment E[k k^T] of edited modules' inputs over a corpus, its HDF5 files,
and AlphaEdit's null-space projection derived from it."""

from .corpus import (
    PAD,
    corpus_fingerprint,
    corpus_id,
    iter_corpus,
    normalize_spec,
    sample_tokens,
    texts_to_batches,
    tokens_to_batches,
)
from .mom2 import (
    compute_mom2,
    null_space_basis,
    null_space_projection,
    read_mom2,
    read_projection,
    read_projection_attrs,
    read_stats,
    read_stats_attrs,
    write_mom2,
    write_projection,
)

__all__ = [
    "PAD",
    "compute_mom2",
    "corpus_fingerprint",
    "corpus_id",
    "iter_corpus",
    "normalize_spec",
    "null_space_basis",
    "null_space_projection",
    "read_mom2",
    "read_projection",
    "read_projection_attrs",
    "read_stats",
    "read_stats_attrs",
    "sample_tokens",
    "texts_to_batches",
    "tokens_to_batches",
    "write_mom2",
    "write_projection",
]
