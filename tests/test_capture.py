"""The capture mechanism: probes give g, the tap records a, under jit, vmap and scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_fixtures import capture_ag, doc_batch, layers_of, rel_err, tiny_lm, tracked_param_subtree

from jaxinf.engine import capture, testing
from jaxinf.engine.capture import CaptureError, Tap


def test_find_layers_names_and_shapes():
    task, params = tiny_lm(jnp.float32)
    layers = layers_of(task, params, doc_batch())
    assert set(layers) == {
        "layers.*.attn.q_proj",
        "layers.*.attn.k_proj",
        "layers.*.attn.v_proj",
        "layers.*.attn.o_proj",
        "layers.*.mlp.fc_in",
        "layers.*.mlp.fc_out",
        "lm_head",
    }
    fc_in = layers["layers.*.mlp.fc_in"]
    assert (fc_in.d_in, fc_in.d_out, fc_in.bias, fc_in.stack) == (8, 12, True, 2)
    assert fc_in.layer_names == ("layers.0.mlp.fc_in", "layers.1.mlp.fc_in")
    assert layers["lm_head"].bias is False and layers["lm_head"].layer_names == ("lm_head",)


def test_select_layers_patterns():
    task, params = tiny_lm(jnp.float32)
    layers = layers_of(task, params, doc_batch())
    assert set(capture.select_layers(layers, "mlp")) == {"layers.*.mlp.fc_in", "layers.*.mlp.fc_out"}
    one = capture.select_layers(layers, ["layers.1.*"])
    assert all(s.indices == (1,) for s in one.values()) and len(one) == 6
    assert one["layers.*.mlp.fc_in"].layer_names == ("layers.1.mlp.fc_in",)
    with pytest.raises(CaptureError, match=r"matches no layer"):
        capture.select_layers(layers, ["decoder.*"])


def test_sum_of_per_sequence_gradients_is_the_weight_gradient():
    """sum_n G[n] from probes and recorded inputs equals jax.grad of the summed loss w.r.t. each kernel and bias."""
    with jax.enable_x64(True):
        task, params = tiny_lm(jnp.float64)
        batch = doc_batch()
        layers = layers_of(task, params, batch)
        cap = jax.jit(lambda p, b: capture_ag(lambda pp, bb, pr: task.train_loss(pp, bb, pr, None), p, b, layers))(
            params, batch
        )
        grads = jax.grad(lambda p: task.train_loss(p, batch, None, None).sum())(params)
        gsub = tracked_param_subtree(grads, layers)
        for name, spec in layers.items():
            G = capture.per_sequence_gradient(cap.a[name], cap.g[name]).sum(-3)  # [*lead, d_out, d_in']
            oracle = jnp.swapaxes(gsub[name]["kernel"], -1, -2)
            if spec.bias:
                oracle = jnp.concatenate([oracle, gsub[name]["bias"][..., None]], axis=-1)
            assert rel_err(G, oracle) < 1e-12, name


def test_padding_is_masked_and_bias_column_is_the_mask():
    task, params = tiny_lm(jnp.float32)
    batch = doc_batch(length=9)
    layers = layers_of(task, params, batch, "mlp")
    cap = capture_ag(lambda p, b, pr: task.train_loss(p, b, pr, None), params, batch, layers)
    a, g = cap.a["layers.*.mlp.fc_in"], cap.g["layers.*.mlp.fc_in"]
    pad = np.asarray(batch["mask"]) == 0
    assert np.all(np.asarray(a)[:, pad] == 0) and np.all(np.asarray(g)[:, pad] == 0)
    np.testing.assert_array_equal(np.asarray(a[..., -1]), np.broadcast_to(np.asarray(batch["mask"]), a.shape[:-1]))


def test_capture_under_vmap_matches_the_batch():
    """vmap over sequences (each a batch of one) gives the batch's a and g."""
    task, params = tiny_lm(jnp.float32)
    batch = doc_batch(length=8)
    layers = layers_of(task, params, batch, "mlp")
    fn = lambda p, b, pr: task.train_loss(p, b, pr, None)
    whole = capture_ag(fn, params, batch, layers)
    one = jax.vmap(lambda row: capture_ag(fn, params, jax.tree.map(lambda x: x[None], row), layers))(batch)
    for k in layers:
        np.testing.assert_allclose(
            np.asarray(one.g[k][:, :, 0]), np.asarray(jnp.moveaxis(whole.g[k], 1, 0)), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            np.asarray(one.a[k][:, :, 0]), np.asarray(jnp.moveaxis(whole.a[k], 1, 0)), rtol=1e-6, atol=1e-6
        )


def test_scanned_block_gives_one_entry_per_layer_index():
    """A scanned block's per-index entries equal an unrolled model's per-layer captures."""
    task, params = tiny_lm(jnp.float32)
    batch = doc_batch(length=8)
    layers = layers_of(task, params, batch, "mlp")
    fn = lambda p, b, pr: task.train_loss(p, b, pr, None)
    scanned = capture_ag(fn, params, batch, layers)

    unrolled_task = testing.tiny_lm_task(unroll=True)
    ufn = lambda p, b, pr: unrolled_task.train_loss(p, b, pr, None)
    ulayers = capture.select_layers(capture.find_layers(ufn, params, batch), "mlp")
    assert set(ulayers) == {"layers.0.mlp.fc_in", "layers.1.mlp.fc_in", "layers.0.mlp.fc_out", "layers.1.mlp.fc_out"}
    unrolled = capture_ag(ufn, params, batch, ulayers)
    for tree in ("a", "g"):
        expanded = capture.expand(getattr(scanned, tree), layers)
        for name, value in expanded.items():
            np.testing.assert_allclose(
                np.asarray(value),
                np.asarray(getattr(unrolled, tree)[name]),
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{tree} {name}",
            )


def test_index_subset_of_a_stacked_block():
    task, params = tiny_lm(jnp.float32)
    batch = doc_batch()
    fn = lambda p, b, pr: task.train_loss(p, b, pr, None)
    all_layers = layers_of(task, params, batch, "mlp")
    one = capture.select_layers(all_layers, ["layers.1.mlp.*"])
    full = capture_ag(fn, params, batch, all_layers)
    part = capture_ag(fn, params, batch, one)
    for k in one:
        assert part.a[k].shape[0] == 1
        np.testing.assert_allclose(np.asarray(part.g[k][0]), np.asarray(full.g[k][1]), rtol=1e-6)


def test_bad_inputs_are_named():
    task, params = tiny_lm(jnp.float32)
    batch = doc_batch()
    fn = lambda p, b, pr: task.train_loss(p, b, pr, None)
    layers = layers_of(task, params, batch, "mlp")
    bad = {"layers.*.mlp.fc_in": jnp.zeros((3, 12))}  # the block has 2 layers: a context of 3 is refused
    with pytest.raises(CaptureError, match=r"layer 'layers\.\*\.mlp\.fc_in': context of leading shape \(3,\)"):
        capture.layer_statistics(fn, params, batch, layers, lambda a, g, m, c: a.sum(), bad, mask=batch["mask"])
    with pytest.raises(CaptureError, match=r"token losses of shape .* do not match the mask"):
        capture_ag(fn, params, batch, layers, batch["mask"][:, :3])
    with pytest.raises(CaptureError, match=r"calls no Tap.linear"):
        capture.find_layers(lambda p, b, pr: (b["mask"], {}), params, batch)
    with pytest.raises(CaptureError, match=r"no token axis"):
        capture.find_layers(lambda p, b, pr: (Tap(pr).linear("w", b["mask"], jnp.ones((7, 2))), {}), params, batch)
