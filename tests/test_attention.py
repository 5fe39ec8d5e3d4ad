"""The EinsumDense and attention twins (issue 13), and the transformer ``vit_tiny``.

* ``AccumEinsumDense``: forward and both gradients bit-exact against
  ``tfaccum.reference.einsum`` / ``einsum_grads``;
* ``AccumMultiHeadAttention`` / ``AccumGroupedQueryAttention``: every attention product
  (QKᵀ and AV, forward and both gradients) bit-exact against the reference on the
  operands the layer actually multiplies (captured from the layer), the projections being
  AccumEinsumDense layers with the layer's policy;
* at full precision, outputs and one SGD step as the Keras originals (to 1e-5);
* lengths (QKᵀ: head size; AV: sequence length) in the inventory and in
  ``analysis.predict``; ``.keras`` reload in a fresh process; ``rewrite`` of ``vit_tiny``
  and ``accumulation_scope``.
"""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import keras
import tensorflow as tf

import tfaccum
from tfaccum import AccumConfig, AccumPolicy, reference
from tfaccum import layers as L
from tfaccum.inventory import gemm_lengths
from tfaccum.model_rewrite import NotEmulatedWarning
from test_conv import random_policy
from test_matmul import assert_bit_equal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rng_values(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------------------
# EinsumDense
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("equation,explicit,out_shape,bias,x_shape", [
    ("abc,cd->abd", "abc,cd->abd", (None, 6), "d", (3, 4, 5)),
    ("abc,cde->abde", "abc,cde->abde", (None, 2, 3), "de", (2, 4, 5)),   # MHA projection
    ("abcd,cde->abe", "abcd,cde->abe", (None, 3), None, (2, 3, 2, 4)),  # two contracted
    ("...b,bc->...c", "xyb,bc->xyc", 6, "c", (3, 2, 5)),                 # ellipsis
])
def test_einsum_dense_matches_reference(equation, explicit, out_shape, bias, x_shape):
    rng = np.random.default_rng(len(equation))
    policy = random_policy(rng)
    layer = L.AccumEinsumDense(equation, out_shape, bias_axes=bias, policy=policy)
    x = _rng_values(rng, x_shape)
    layer.build(x.shape)
    kernel = _rng_values(rng, layer.kernel.shape)
    layer.kernel.assign(kernel)
    layer.step_counter = tf.constant(6, tf.int64)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt)
    dy = _rng_values(rng, y.shape)
    dx, dk = tape.gradient(y, [xt, layer.kernel], output_gradients=tf.constant(dy))
    bias_value = 0.0 if layer.bias is None else layer.bias.numpy()  # zeros at build
    assert_bit_equal(y.numpy() - bias_value, reference.einsum(explicit, x, kernel, policy, 6))
    rdx, rdk = reference.einsum_grads(explicit, x, kernel, dy, policy, 6)
    assert_bit_equal(dx, rdx, "dx")
    assert_bit_equal(dk, rdk, "dkernel")


def test_einsum_dense_full_precision_is_keras():
    keras.utils.set_random_seed(2)
    inp = keras.Input((4, 6))
    x = keras.layers.EinsumDense("abc,cde->abde", (4, 2, 3), bias_axes="de",
                                 activation="relu", name="proj")(inp)
    x = keras.layers.EinsumDense("abde,de->ab", 4, name="contract2")(x)
    x = keras.layers.EinsumDense("...b,bc->...c", 3, bias_axes="c", name="ellipsis")(x)
    model = keras.Model(inp, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotEmulatedWarning)
        new = tfaccum.rewrite(model, AccumPolicy())
    assert {type(l).__name__ for l in new.layers[1:]} == {"AccumEinsumDense"}
    rng = np.random.default_rng(2)
    x, y = _rng_values(rng, (5, 4, 6)), _rng_values(rng, (5, 3))
    np.testing.assert_allclose(new(x), model(x), rtol=1e-5, atol=1e-5)
    for m in (model, new):
        m.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        m.train_on_batch(x, y)
    for a, b in zip(model.get_weights(), new.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# Attention: every product through the reference, on the operands the layer multiplies
# --------------------------------------------------------------------------------------
class _Capture:
    """Records (equation, a, b, y) of every accum_einsum the attention layers call."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = L.accum_einsum

        def recording(equation, a, b, policy, step=0, name=None):
            y = original(equation, a, b, policy, step=step, name=name)
            self.calls.append((equation, a, b, y, policy))
            return y

        monkeypatch.setattr(L, "accum_einsum", recording)


def _attention_layers():
    return [
        ("mha", lambda p: L.AccumMultiHeadAttention(num_heads=2, key_dim=3, value_dim=2,
                                                    policy=p),
         lambda p: keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, value_dim=2)),
        ("gqa", lambda p: L.AccumGroupedQueryAttention(head_dim=3, num_query_heads=4,
                                                       num_key_value_heads=2, policy=p),
         lambda p: keras.layers.GroupQueryAttention(head_dim=3, num_query_heads=4,
                                                    num_key_value_heads=2)),
    ]


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_attention_products_match_reference(kind, monkeypatch):
    rng = np.random.default_rng(11 if kind == "mha" else 12)
    policy = random_policy(rng)
    build = dict((k, twin) for k, twin, _ in _attention_layers())[kind]
    layer = build(policy)
    q, v = _rng_values(rng, (2, 3, 5)), _rng_values(rng, (2, 4, 5))
    mask = rng.random((2, 3, 4)) < 0.8
    mask[:, :, 0] = True
    layer(q, v, attention_mask=mask)  # builds it
    layer.step_counter = tf.constant(9, tf.int64)
    for sub in layer._flatten_layers(include_self=False, recursive=True):
        if isinstance(sub, L.AccumEinsumDense):
            assert sub.policy == policy
            sub.kernel.assign(_rng_values(rng, sub.kernel.shape))
    capture = _Capture(monkeypatch)
    qt, vt = tf.constant(q), tf.constant(v)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([qt, vt])
        out = layer(qt, vt, attention_mask=mask)
        loss = tf.reduce_sum(out * _rng_values(rng, out.shape))
    products = [c for c in capture.calls if c[0].split("->")[0].count(",") == 1
                and len(c[1].shape) == 4 and len(c[2].shape) == 4]
    # The projections are AccumEinsumDense (tested above); the two products follow them.
    qk, av = products[-2], products[-1]
    assert qk[1].shape[1] == 3 and qk[2].shape[1] == 4  # the query (T = 3) first
    for eq, a, b, y, p in (qk, av):
        assert p == policy
        dy, da, db = tape.gradient(loss, [y, a, b])
        assert_bit_equal(y, reference.einsum(eq, a.numpy(), b.numpy(), policy, 9), eq)
        rda, rdb = reference.einsum_grads(eq, a.numpy(), b.numpy(), dy.numpy(), policy, 9)
        assert_bit_equal(da, rda, eq + " da")
        assert_bit_equal(db, rdb, eq + " db")
    # QKᵀ sums the head size (3); AV the key sequence (4).
    assert qk[1].shape[-1] == 3 and av[2].shape[1] == 4
    del tape


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_attention_full_precision_is_keras(kind):
    _, twin, original = [t for t in _attention_layers() if t[0] == kind][0]
    keras.utils.set_random_seed(3)
    q_in, v_in = keras.Input((3, 5)), keras.Input((4, 5))
    mask_in = keras.Input((3, 4), dtype="bool")
    out = original(None)(q_in, v_in, attention_mask=mask_in)
    model = keras.Model([q_in, v_in, mask_in], keras.layers.Dense(2)(out))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotEmulatedWarning)
        new = tfaccum.rewrite(model, AccumPolicy())
    assert all(type(l).__name__.startswith("Accum") for l in new.layers[3:])
    rng = np.random.default_rng(4)
    x = [_rng_values(rng, (2, 3, 5)), _rng_values(rng, (2, 4, 5)), rng.random((2, 3, 4)) < 0.7]
    x[2][:, :, 0] = True
    np.testing.assert_allclose(new(x), model(x), rtol=1e-5, atol=1e-5)
    y = _rng_values(rng, (2, 3, 2))
    for m in (model, new):
        m.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        m.train_on_batch(x, y)
    for a, b in zip(model.get_weights(), new.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_causal_mask_and_policy_change_reach_every_gemm():
    keras.utils.set_random_seed(5)
    x = np.random.default_rng(5).standard_normal((2, 4, 6)).astype(np.float32)
    keras_layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)
    want = keras_layer(x, x, use_causal_mask=True)
    twin = L.AccumMultiHeadAttention.from_config(
        {**keras_layer.get_config(), "policy": AccumPolicy().to_dict()})
    twin(x, x)
    twin.set_weights(keras_layer.get_weights())
    np.testing.assert_allclose(twin(x, x, use_causal_mask=True), want, rtol=1e-5, atol=1e-5)
    narrow = AccumPolicy.uniform(AccumConfig("e5m2"))
    twin.policy = narrow
    assert all(sub.policy == narrow for sub in twin._flatten_layers(include_self=False)
               if isinstance(sub, L.AccumEinsumDense))
    assert np.abs(twin(x, x, use_causal_mask=True) - want).max() > 1e-3


def test_accumulation_scope_builds_attention_twins():
    policy = AccumPolicy.uniform(AccumConfig("e6m9"))
    with tfaccum.accumulation_scope(policy):
        mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2)
        ein = keras.layers.EinsumDense("ab,bc->ac", 3)
    assert isinstance(mha, L.AccumMultiHeadAttention) and mha.policy == policy
    assert isinstance(ein, L.AccumEinsumDense)
    mha(np.ones((1, 3, 4), np.float32), np.ones((1, 3, 4), np.float32))
    assert {type(s).__name__ for s in mha._flatten_layers(include_self=False)
            if "Dense" in type(s).__name__} == {"AccumEinsumDense"}


# --------------------------------------------------------------------------------------
# Lengths, predict, reload
# --------------------------------------------------------------------------------------
def attention_model():
    q_in, kv_in = keras.Input((5, 8), name="q"), keras.Input((7, 6), name="kv")
    x = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, value_dim=3, name="mha")(
        q_in, kv_in)
    x = keras.layers.GroupQueryAttention(head_dim=4, num_query_heads=4, num_key_value_heads=2,
                                         name="gqa")(x, x)
    x = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 10), name="ed")(x)
    return keras.Model([q_in, kv_in], keras.layers.Dense(3, name="fc")(x), name="attn")


def test_inventory_lists_every_attention_gemm():
    new = tfaccum.rewrite(attention_model(), AccumPolicy())
    rows = {(r.layer, r.gemm): (r.fwd, r.bwd, r.grad) for r in gemm_lengths(new, 16)}
    assert list(rows) == [
        ("mha", "query"), ("mha", "key"), ("mha", "value"), ("mha", "attn/qk"),
        ("mha", "attn/av"), ("mha", "attention_output"), ("gqa", "query"), ("gqa", "key"),
        ("gqa", "value"), ("gqa", "attn/qk"), ("gqa", "attn/av"),
        ("gqa", "attention_output"), ("ed", ""), ("fc", "")]
    # T = 5 queries, S = 7 keys, batch 16: QKᵀ sums key_dim, dq the keys, dk the queries;
    # AV sums the keys, d scores value_dim, dv the queries.
    assert rows[("mha", "attn/qk")] == (4, 7, 5)
    assert rows[("mha", "attn/av")] == (7, 3, 5)
    assert rows[("mha", "query")] == (8, 2 * 4, 16 * 5)
    assert rows[("mha", "key")] == (6, 2 * 4, 16 * 7)
    assert rows[("mha", "attention_output")] == (2 * 3, 8, 16 * 5)
    assert rows[("gqa", "attn/qk")] == (4, 5, 5)
    assert rows[("gqa", "attn/av")] == (5, 4, 5)
    assert rows[("ed", "")] == (8, 10, 16 * 5)
    text = tfaccum.summary(new, batch_size=16, print_fn=None)
    assert "mha (AccumMultiHeadAttention, attn/qk)" in text and "not emulated" not in text


def test_keras_file_reloads_in_a_fresh_process(tmp_path):
    keras.utils.set_random_seed(6)
    policy = AccumPolicy.uniform(AccumConfig("e6m8", chunk_size=4))
    model = tfaccum.rewrite(attention_model(), policy)
    rng = np.random.default_rng(3)
    x = [_rng_values(rng, (2, 5, 8)), _rng_values(rng, (2, 7, 6))]
    path, data = str(tmp_path / "attn.keras"), str(tmp_path / "io.npz")
    model.save(path)
    np.savez(data, q=x[0], kv=x[1], y=model(x).numpy())
    code = (
        "import sys, json, numpy as np, keras, tfaccum\n"
        "m = keras.models.load_model(sys.argv[1]); io = np.load(sys.argv[2])\n"
        "np.testing.assert_array_equal(m([io['q'], io['kv']]).numpy(), io['y'])\n"
        "subs = lambda l: [s for s in l._flatten_layers(include_self=False) if hasattr(s, 'policy')]\n"
        "print(json.dumps({l.name: [type(l).__name__, l.policy.to_json(),"
        " sorted((s.name, type(s).__name__) for s in subs(l))] for l in m.layers"
        " if hasattr(l, 'policy')}))\n")
    proc = subprocess.run([sys.executable, "-c", code, path, data], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(loaded) == {"mha", "gqa", "ed", "fc"}
    assert loaded["mha"][0] == "AccumMultiHeadAttention"
    assert loaded["gqa"][0] == "AccumGroupedQueryAttention"
    assert all(v[1] == policy.to_json() for v in loaded.values())
    assert ["attention_output", "AccumEinsumDense"] in loaded["mha"][2]


# --------------------------------------------------------------------------------------
# vit_tiny: rewrite, predict, the driver
# --------------------------------------------------------------------------------------
def test_vit_tiny_is_emulated_entirely():
    keras.utils.set_random_seed(8)
    model = tfaccum.models.vit_tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotEmulatedWarning)
        new = tfaccum.rewrite(model, AccumPolicy())
    report = new.tfaccum_report
    assert report.not_emulated == () and report.kept == ()
    assert set(report.replaced) == {
        "patch_embed", "block1_attn", "block1_mlp1", "block1_mlp2", "block2_attn",
        "block2_mlp1", "block2_mlp2", "predictions"}
    text = tfaccum.summary(new, batch_size=64, print_fn=None)
    assert "not emulated" not in text and "Float32 GEMM layers" not in text
    rows = {(r.layer, r.gemm): (r.fwd, r.bwd, r.grad) for r in gemm_lengths(new, 64)}
    # 16 tokens (2x2 patches of 8x8), 4 heads of 8: QKᵀ sums 8, AV sums 16.
    assert rows[("block1_attn", "attn/qk")] == (8, 16, 16)
    assert rows[("block2_attn", "attn/av")] == (16, 8, 16)
    x = np.random.default_rng(8).standard_normal((3, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(new(x), model(x), rtol=1e-5, atol=1e-6)


def test_predict_lists_attention_and_separable_gemms():
    keras.utils.set_random_seed(9)
    model = tfaccum.models.vit_tiny()
    x = np.random.default_rng(9).standard_normal((8, 8, 8, 1)).astype(np.float32)
    plan = tfaccum.analysis.predict(model, batch_size=32, data=x, direct=False)
    by = {p.label: p for p in plan.layers}
    qk, av = by["block1_attn (attn/qk)"], by["block1_attn (attn/av)"]
    assert (qk.fwd.length, qk.bwd.length, qk.grad.length) == (8, 16, 16)
    assert (av.fwd.length, av.bwd.length, av.grad.length) == (16, 8, 16)
    assert by["block2_attn (query)"].grad.length == 32 * 16
    assert "block2_attn (attn/av)" in plan.table()
    # One policy per layer: per GEMM the widest of its sets.
    policy = plan.policies()["block1_attn"]
    sets = [p for p in plan.layers if p.layer == "block1_attn"]
    assert policy.grad.accumulator.mantissa_bits == max(p.grad.mantissa_bits for p in sets)
    assert plan.policies().keys() == {l.name for l in tfaccum.inventory.planned_layers(model)}
    assert tfaccum.analysis.PrecisionPlan.from_json(plan.to_json()) == plan

    inp = keras.Input((6, 6, 3))
    y = keras.layers.SeparableConv2D(4, 3, depth_multiplier=2, name="sep")(inp)
    sep_model = keras.Model(inp, keras.layers.Dense(2, name="fc")(keras.layers.Flatten()(y)))
    plan = tfaccum.analysis.predict(sep_model, batch_size=8, sparsity=None)
    by = {p.label: p for p in plan.layers}
    dw, pw = by["sep (depthwise)"], by["sep (pointwise)"]
    assert (dw.fwd.length, dw.bwd.length, dw.grad.length) == (9, 18, 8 * 4 * 4)
    assert (pw.fwd.length, pw.bwd.length, pw.grad.length) == (6, 4, 8 * 4 * 4)


def test_vit_tiny_trains_in_the_driver(tmp_path):
    from tfaccum import train

    status = train.main(["tfaccum.train", "--model=vit_tiny", "--max_train_examples=128",
                         "--max_test_examples=64", "--batch_size=32", "--epochs=1",
                         "--seeds=1", "--health_every_steps=0", f"--model_dir={tmp_path}"])
    assert status == 0
    plan = json.loads(next(tmp_path.rglob("plan.json")).read_text())
    labels = {(l["layer"], l.get("gemm_set", "")) for l in plan["layers"]}
    assert ("block1_attn", "attn/qk") in labels and ("block2_attn", "attn/av") in labels
