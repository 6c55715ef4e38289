"""Data: documents (JSONL, TFDS), queries, tokenization and batching; see docs/data.md."""
