"""Logical axis names drive real sharding: a scanned DecoderLM placed on an 8-device mesh through
logical axis rules computes the same logits as the unsharded model."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from flaxattn.models import DecoderLM
from flaxattn.nn import TransformerConfig

# flax keeps a logical name without a rule as a mesh axis name, so every name gets a rule.
RULES = (("batch", "data"), ("heads", "tensor"), ("mlp", "tensor"), ("embed", None),
         ("layers", None), ("kv_heads", None), ("head_dim", None), ("vocab", None), ("length", None))


def test_sharded_forward_matches_unsharded():
  config = TransformerConfig(vocab_size=37, d_model=16, num_heads=4, kv_heads=2, mlp_dim=32,
                             num_layers=2, activation="silu", gated_mlp=True, norm="rmsnorm",
                             use_bias=False, positions="rope", scan_layers=True, max_length=8)
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 37, size=(4, 8)))
  forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids)[0])
  want = forward(state, ids)

  mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
    specs = nnx.get_partition_spec(state)
    sharded = jax.device_put(state, jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs))
    got = forward(sharded, jax.device_put(ids, NamedSharding(mesh, PartitionSpec("data"))))
  query = sharded["decoder"]["layers"]["attention"]["query"]["kernel"]
  assert query[...].sharding.spec == PartitionSpec(None, None, "tensor", None)  # [layers, embed, heads, head_dim]
  np.testing.assert_allclose(got, want, atol=1e-5)  # float32, different reduction order


def test_constrain_and_param_reject_unknown_logical_names():
  from flaxattn.nn.sharding import LOGICAL_AXES, constrain, param  # pylint: disable=import-outside-toplevel
  known = re.escape(str(LOGICAL_AXES))
  with pytest.raises(ValueError, match=rf"logical_axes \('batch', 'seq'\) name unknown logical "
                     rf"axes \['seq'\]; known: {known}"):
    constrain(jnp.zeros((2, 3)), ("batch", "seq"))  # Refused without a mesh too.
  with pytest.raises(ValueError, match=rf"axes \('embed', 'hidden'\) name unknown logical axes "
                     rf"\['hidden'\]; known: {known}"):
    param(nnx.Rngs(0), jax.nn.initializers.zeros, (2, 3), ("embed", "hidden"), jnp.float32)
  assert constrain(jnp.zeros((2, 3)), ("batch", None)).shape == (2, 3)
