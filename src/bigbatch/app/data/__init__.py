"""The command's data: documents (:mod:`.corpus`), byte windows (:mod:`.windows`), sample order
(:mod:`.order`) and token-budget micro-batches of windows (:mod:`.packed`)."""

from .corpus import (
    DataError,
    Document,
    load_documents,
    split_definitions,
    split_documents,
    stdlib_definitions,
    stdlib_root,
)
from .order import eval_batches, global_batches, take_samples
from .packed import packed_micro_batches
from .windows import TokenWindows, vary_lengths

__all__ = ["DataError", "Document", "TokenWindows", "eval_batches", "global_batches",
           "load_documents", "packed_micro_batches", "split_definitions", "split_documents",
           "stdlib_definitions", "stdlib_root", "take_samples", "vary_lengths"]
