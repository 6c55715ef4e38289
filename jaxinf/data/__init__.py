"""Data: documents (JSONL, compressed JSONL, Parquet, Arrow shards, TFDS), queries, tokenization and batching
(see docs/data.md).

The layer between files and the engine's causal-LM batches (``tokens``,
``mask``, ``weights``, plus ``index`` / ``chunk`` / ``row`` to map rows back to
documents). TensorFlow is never imported; TFDS is imported only when a TFDS
dataset is read or written.
"""

from jaxinf.data.batching import (
    BatchPlan,
    DocumentBatches,
    PlanReport,
    bucket_lengths,
    document_batches,
    document_lengths,
    make_batch_plan,
    prefetch,
    scatter_columns,
)
from jaxinf.data.documents import Document, JsonlDocuments, ReadReport
from jaxinf.data.errors import DataError
from jaxinf.data.queries import Query, encode_queries, query_batches, read_queries, read_release, release_documents
from jaxinf.data.shards import ShardedDocuments
from jaxinf.data.sources import open_documents
from jaxinf.data.tfds_documents import TfdsDocuments
from jaxinf.data.tokenize import EncodedQuery, TextEncoder, load_tokenizer

__all__ = [
    "DataError",
    "Document",
    "DocumentBatches",
    "EncodedQuery",
    "JsonlDocuments",
    "BatchPlan",
    "PlanReport",
    "Query",
    "ReadReport",
    "ShardedDocuments",
    "TextEncoder",
    "TfdsDocuments",
    "bucket_lengths",
    "document_batches",
    "document_lengths",
    "encode_queries",
    "load_tokenizer",
    "make_batch_plan",
    "open_documents",
    "prefetch",
    "query_batches",
    "read_queries",
    "read_release",
    "release_documents",
    "scatter_columns",
]
