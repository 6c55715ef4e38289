"""Progress of a pass over the documents (issue 28): documents/s, tokens/s and the time left."""

from __future__ import annotations

import io

import numpy as np
from data_support import documents_file, make_tokenizer

from jaxinf.data.batching import document_lengths
from jaxinf.data.documents import JsonlDocuments
from jaxinf.data.tokenize import TextEncoder
from jaxinf.engine.progress import Progress


def test_running_totals_give_a_line_every_interval_and_one_at_the_end_with_rates_and_eta():
    """The token counts' progress (:meth:`Progress.at`, running totals): a first line at once, then one per
    interval with documents/s, tokens/s and the ETA of the steady state (after the first chunk), and always a line
    at the end."""
    now = [100.0]
    stream = io.StringIO()
    progress = Progress("token counts", 1000, unit="documents", interval=30, stream=stream, clock=lambda: now[0])
    progress.enabled = True
    now[0] = 110.0
    progress.at(100, 50_000)  # 10 s in: the first chunk, no steady rate yet
    now[0] = 120.0
    progress.at(200, 100_000)  # 10 s after the first line: nothing
    now[0] = 140.0
    progress.at(400, 200_000)  # 30 s after the first chunk: 10 documents/s, 600 left: 60 s
    now[0] = 150.0
    progress.at(500, 250_000)  # 10 s after the last line: nothing
    now[0] = 200.0
    progress.at(1000, 500_000)  # the end: always
    assert stream.getvalue().splitlines() == [
        "token counts: 100/1,000 documents, 10.0 documents/s, 5,000 tokens/s, elapsed 0:00:10, ETA ?",
        "token counts: 400/1,000 documents, 10.0 documents/s, 5,000 tokens/s, elapsed 0:00:40, ETA 0:01:00",
        "token counts: 1,000/1,000 documents, 10.0 documents/s, 5,000 tokens/s, elapsed 0:01:40, ETA 0:00:00",
    ]


def test_token_counts_report_their_running_totals(tmp_path):
    docs = JsonlDocuments(documents_file(tmp_path / "docs.jsonl", n=50))
    encoder = TextEncoder(make_tokenizer("both"))
    calls: list[tuple[int, int]] = []
    lengths = document_lengths(docs, encoder, chunk=16, progress=lambda d, t: calls.append((d, t)))
    assert [d for d, _ in calls] == [16, 32, 48, 50]
    assert [t for _, t in calls] == [int(lengths[:d].sum()) for d, _ in calls]
    np.testing.assert_array_equal(lengths, document_lengths(docs, encoder, chunk=7))
