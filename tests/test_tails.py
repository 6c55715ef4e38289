"""The scoring pass's running top rows (:mod:`jaxinf.engine.tails`) against a brute-force top-K over every row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf.engine import tails


def _batches(rng, Q: int, L: int, T: int, sizes: list[tuple[int, int]]):
    """Batches of ``B`` rows of ``width <= T`` tokens; the last two rows of each are padding (index -1)."""
    start = 0
    for B, width in sizes:
        index = np.arange(start, start + B, dtype=np.int32)
        index[-2:] = -1
        start += B
        mask = (np.arange(width)[None] < rng.integers(1, width + 1, B)[:, None]).astype(np.float32)
        yield {
            "total": rng.normal(size=(Q, B)).astype(np.float32),
            "per_layer": rng.normal(size=(L, Q, B)).astype(np.float32),
            "per_token": rng.normal(size=(Q, B, width)).astype(np.float32),
            "batch": {
                "index": index,
                "chunk": np.zeros(B, np.int32),
                "mask": mask,
                "tokens": rng.integers(1, 100, (B, width)).astype(np.int32),
            },
        }


def test_the_tails_hold_the_top_rows_of_every_batch_with_their_breakdowns():
    rng = np.random.default_rng(0)
    Q, K, L, T = 3, 5, 4, 8
    batches = list(_batches(rng, Q, L, T, [(6, 8), (4, 3), (7, 5), (3, 8)]))
    update = jax.jit(tails.update)
    kept = tails.init(Q, K, L, T)
    for b in batches:
        kept = update(kept, b["total"], b["per_layer"], b["per_token"], b["batch"])
    kept = jax.tree.map(np.asarray, kept)
    rows = {}  # document -> (total [Q], per-layer [L, Q], tokens, ids, length)
    for b in batches:
        for j, d in enumerate(b["batch"]["index"].tolist()):
            if d >= 0:
                n = int(b["batch"]["mask"][j].sum())
                rows[d] = (b["total"][:, j], b["per_layer"][:, :, j], b["per_token"][:, j], b["batch"]["tokens"][j], n)
    for q in range(Q):
        want = sorted(rows, key=lambda d: -rows[d][0][q])[:K]
        assert kept.index[q].tolist() == want
        for s, d in enumerate(want):
            total, per_layer, per_token, ids, n = rows[d]
            assert kept.score[q, s] == total[q] and kept.length[q, s] == n and kept.has_tokens[q, s]
            np.testing.assert_array_equal(kept.layers[q, s], per_layer[:, q])
            width = per_token.shape[-1]
            np.testing.assert_array_equal(kept.tokens[q, s, :width], per_token[q])
            np.testing.assert_array_equal(kept.tokens[q, s, width:], 0)
            np.testing.assert_array_equal(kept.ids[q, s, :width], ids)
            assert tails.found(kept, q, d, single_row=True) == s
            assert tails.found(kept, q, d, single_row=False) is None  # a split document is never taken from here
        assert tails.found(kept, q, sorted(rows, key=lambda d: -rows[d][0][q])[K], single_row=True) is None


def test_rows_without_per_token_scores_are_not_found_and_empty_slots_stay_empty():
    rng = np.random.default_rng(1)
    Q, K, L, T = 2, 6, 3, 4
    (b,) = _batches(rng, Q, L, T, [(5, 4)])  # 3 real rows for 6 slots
    kept = jax.tree.map(np.asarray, tails.update(tails.init(Q, K, L, T), b["total"], b["per_layer"], None, b["batch"]))
    assert (kept.index[:, 3:] == -1).all() and np.isneginf(kept.score[:, 3:]).all()
    assert not kept.has_tokens.any()
    assert all(tails.found(kept, q, d, single_row=True) is None for q in range(Q) for d in range(3))
    np.testing.assert_array_equal(np.sort(kept.index[:, :3], axis=1), np.tile(np.arange(3), (Q, 1)))
    assert jnp.dtype(kept.tokens.dtype) == jnp.float32
