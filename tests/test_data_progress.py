"""Progress of a pass over the documents (issue 28): documents/s, tokens/s and the time left."""

from __future__ import annotations

import numpy as np
from data_support import documents_file, make_tokenizer

from jaxinf.data.batching import document_lengths
from jaxinf.data.documents import JsonlDocuments
from jaxinf.data.progress import PassProgress, format_duration
from jaxinf.data.tokenize import TextEncoder


def test_durations_read_as_a_person_reads_them():
    assert [format_duration(s) for s in (0, 12.4, 59.6, 252, 3600, 3900, 7 * 3600 + 59)] == [
        "0s", "12s", "1m00s", "4m12s", "1h00m", "1h05m", "7h00m"]


def test_a_line_every_interval_and_one_at_the_end_with_rates_and_eta():
    now = [100.0]
    lines: list[str] = []
    progress = PassProgress("token counts", 1000, every=30, clock=lambda: now[0], emit=lines.append)
    now[0] = 110.0
    progress(100, 50_000)            # 10 s in: too soon, nothing
    assert lines == []
    now[0] = 140.0
    progress(400, 200_000)           # 40 s in: 10 documents/s, 600 left: 60 s
    now[0] = 150.0
    progress(500, 250_000)           # 10 s after the last line: nothing
    now[0] = 200.0
    progress(1000, 500_000)          # the end: always, with the total time
    assert lines == [
        "token counts: 400/1,000 documents (40.0%), 200,000 tokens, 10 documents/s, 0.01 M tokens/s, ETA 1m00s",
        ("token counts: 1,000/1,000 documents (100.0%), 500,000 tokens, 10 documents/s, 0.01 M tokens/s, "
         "done in 1m40s"),
    ]


def test_token_counts_report_their_running_totals(tmp_path):
    docs = JsonlDocuments(documents_file(tmp_path / "docs.jsonl", n=50))
    encoder = TextEncoder(make_tokenizer("both"))
    calls: list[tuple[int, int]] = []
    lengths = document_lengths(docs, encoder, chunk=16, progress=lambda d, t: calls.append((d, t)))
    assert [d for d, _ in calls] == [16, 32, 48, 50]
    assert [t for _, t in calls] == [int(lengths[:d].sum()) for d, _ in calls]
    np.testing.assert_array_equal(lengths, document_lengths(docs, encoder, chunk=7))
