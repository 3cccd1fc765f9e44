"""Tensor parallelism gives the same greedy tokens as one device (forced CPU devices)."""

import jax
import numpy as np
import pytest

from jaxinfer.model.sharding import make_mesh, place_params
from jaxinfer.reference import ReferenceGenerator


@pytest.mark.parametrize("tp", [2, 4])
def test_default_model_greedy_tokens_match_single_device(default_checkpoint, tp):
    ck = default_checkpoint
    prompt = ck.tokenizer.encode("The three primary colours are")
    single = ReferenceGenerator(*place_params(ck.params, ck.config, make_mesh(1), "float32"), max_len=64)
    params, cfg = place_params(ck.params, ck.config, make_mesh(tp), "float32")
    sharded = ReferenceGenerator(params, cfg, max_len=64)
    assert cfg.num_kv_heads % tp == 0 and len(params["layers"][0]["w_qkv"].sharding.device_set) == tp
    expected = single.generate([prompt], 24)
    assert sharded.generate([prompt], 24) == expected
    np.testing.assert_allclose(sharded.prompt_logits([prompt])[0, -1], single.prompt_logits([prompt])[0, -1],
                               rtol=1e-4, atol=1e-4)


def test_mesh_larger_than_device_count_is_a_clear_error():
    from jaxinfer.errors import EngineError

    with pytest.raises(EngineError, match="needs 16 devices"):
        make_mesh(16)
    assert len(jax.devices()) == 8
