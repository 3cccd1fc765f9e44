"""Bfloat16 weights stored as AMX panels (jaxinfer.model.panel_weight): the weight they stand for,
the token lookup of a tied table, which params an engine packs, and their restore structure and
shardings."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from conftest import CHECKPOINTS_DIR
from jaxinfer.checkpoint import load_checkpoint
from jaxinfer.model.layers import embedding_columns, linear
from jaxinfer.model.llama import LINEAR_WEIGHTS, compute_logits, param_shapes
from jaxinfer.model.panel_weight import PanelWeight, has_panel_weights, pack_panel_weights
from jaxinfer.model.sharding import make_mesh, param_shardings, place_params
from pallas_kernels import cpu_dense_dot


def random_weight(rng, k: int, n: int) -> jax.Array:
    return jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)


def test_panel_weight_multiplies_and_looks_up_as_the_weight_it_stands_for(rng):
    w = random_weight(rng, 96, 512)
    stored = PanelWeight(cpu_dense_dot.pack_panels(w))
    assert stored.shape == (96, 512) and stored.dtype == jnp.bfloat16
    x = jnp.asarray(rng.standard_normal((2, 3, 96)), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(stored.matmul(x), np.float32), np.asarray(linear(x, w), np.float32))
    # As the head: the model's float32 logits of bfloat16 hidden states, the same as from the plain table.
    np.testing.assert_array_equal(np.asarray(compute_logits({"embed": stored}, x)),
                                  np.asarray(compute_logits({"embed": w}, x)))
    # Token ids in range and out of it (clipped, as jnp.take's mode="clip").
    tokens = jnp.asarray(np.concatenate([rng.integers(0, 512, (2, 7)), [[-3] * 7, [600] * 7]]), jnp.int32)
    got = jax.jit(embedding_columns)(stored, tokens)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(embedding_columns(w, tokens), np.float32))
    assert got.shape == (4, 7, 96)


def test_an_engine_packs_every_layer_matmul_and_the_head(rng):
    for name, tied in (("tiny-smollm2", True), ("tiny-llama3", False)):
        checkpoint = load_checkpoint(CHECKPOINTS_DIR / name)
        assert checkpoint.config.tie_word_embeddings == tied
        params, cfg = place_params(checkpoint.params, checkpoint.config, make_mesh(1), "bfloat16")
        packed = pack_panel_weights(params)
        assert has_panel_weights(packed) and not has_panel_weights(params)
        assert all(isinstance(layer[w], PanelWeight) for layer in packed["layers"] for w in LINEAR_WEIGHTS)
        # A tied table is the head: packed in place, read by the lookup through its panels.
        head = "embed" if tied else "lm_head"
        assert isinstance(packed[head], PanelWeight) and ("lm_head" in packed) == (not tied)
        np.testing.assert_array_equal(cpu_dense_dot.unpack_panels(packed[head].panels), params[head])
        # The restore target of a built engine: the same structure, shapes and dtypes, with shardings.
        structs = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16), param_shapes(cfg),
                               is_leaf=lambda x: isinstance(x, tuple))
        abstract = jax.eval_shape(pack_panel_weights, structs)
        assert jax.tree.structure(abstract) == jax.tree.structure(packed)
        assert [(a.shape, a.dtype) for a in jax.tree.leaves(abstract)] == \
               [(a.shape, a.dtype) for a in jax.tree.leaves(packed)]
        assert jax.tree.structure(param_shardings(cfg, make_mesh(1), packed)) == jax.tree.structure(packed)


def test_weights_with_whole_panels_are_packed_before_they_are_placed(rng):
    """As an engine builds its params: the checkpoint's float32 numpy arrays packed as views, then
    cast to bfloat16 and placed (place_params makes the one copy); shapes off 32 stay as they are."""
    def weight(k, n):
        return rng.standard_normal((k, n)).astype(np.float32)

    layer = {"w_qkv": weight(64, 96), "wo": weight(64, 48), "w_gate_up": weight(64, 128), "w_down": weight(40, 64),
             "attn_norm": np.ones(64, np.float32), "mlp_norm": np.ones(64, np.float32)}
    params = {"embed": weight(64, 160), "final_norm": np.ones(64, np.float32), "layers": [layer]}
    packed = pack_panel_weights(params)
    kinds = {name: type(w).__name__ for name, w in packed["layers"][0].items()}
    assert kinds == {"w_qkv": "PanelWeight", "wo": "ndarray", "w_gate_up": "PanelWeight", "w_down": "ndarray",
                     "attn_norm": "ndarray", "mlp_norm": "ndarray"}
    assert np.shares_memory(packed["embed"].panels, params["embed"])
    cfg = load_checkpoint(CHECKPOINTS_DIR / "tiny-smollm2").config
    cfg = dataclasses.replace(cfg, hidden_size=64, intermediate_size=64, num_layers=1, vocab_size=160,
                              num_heads=2, num_kv_heads=1, head_dim=32)
    placed, _ = place_params(packed, cfg, make_mesh(1), "bfloat16")
    assert placed["embed"].dtype == jnp.bfloat16 and isinstance(placed["embed"].panels, jax.Array)
    np.testing.assert_array_equal(np.asarray(cpu_dense_dot.unpack_panels(placed["layers"][0]["w_gate_up"].panels)),
                                  np.asarray(jnp.asarray(layer["w_gate_up"], jnp.bfloat16)))
