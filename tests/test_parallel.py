"""Mesh shapes, logical-axis rules, and directly sharded state on 8 simulated CPU devices."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from flaxattn import parallel
from flaxattn.models import DecoderLM
from flaxattn.nn import TransformerConfig
from flaxattn.nn.sharding import logical_spec
from flaxattn.train import init_train_state

CONFIG = TransformerConfig(vocab_size=64, d_model=32, num_heads=4, kv_heads=2, mlp_dim=64,
                           num_layers=2, max_length=16, positions="rope", norm="rmsnorm",
                           scan_layers=True)


def test_mesh_shape_fills_minus_one_and_rejects_bad_shapes():
  assert parallel.mesh_shape({"data": -1, "tensor": 2}, 8) == (4, 1, 2, 1)
  assert parallel.mesh_shape({"fsdp": 8}, 8) == (1, 8, 1, 1)
  with pytest.raises(ValueError, match=r"config.mesh .* needs 6 devices, but there are 8"):
    parallel.mesh_shape({"data": 3, "tensor": 2}, 8)
  with pytest.raises(ValueError, match="a multiple of 3"):
    parallel.mesh_shape({"data": -1, "tensor": 3}, 8)
  with pytest.raises(ValueError, match="config.mesh.fsdp must be a positive int or -1, got 0"):
    parallel.mesh_shape({"fsdp": 0}, 8)
  with pytest.raises(ValueError, match="one axis of size -1"):
    parallel.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match=r"unknown axes \['model'\]"):
    parallel.mesh_shape({"model": 8}, 8)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "context": 1}
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


def test_rules_presets_overrides_and_specs():
  rules = parallel.make_rules("fsdp_tp", "mlp=,length=context,batch=data")
  mapping = dict(rules)
  assert set(mapping) == {"batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab",
                          "layers"}
  assert mapping["mlp"] is None and mapping["length"] == ("context",)
  assert mapping["batch"] == ("data",) and mapping["embed"] == "fsdp"
  fsdp = parallel.make_rules("fsdp")
  # `fsdp` is taken by the batch dimension, so the activation's embed dimension stays whole.
  assert logical_spec(("batch", "length", "embed"), fsdp) == P(("data", "fsdp"), None, None)
  assert logical_spec(("embed", "heads", "head_dim"), fsdp) == P("fsdp", None, None)
  assert parallel.unused_mesh_axes(fsdp, {"data": 1, "fsdp": 2, "tensor": 2, "context": 1}) == [
      "tensor"]
  with pytest.raises(ValueError, match="config.sharding.preset must be one of"):
    parallel.make_rules("zero3")
  with pytest.raises(ValueError, match="'hidden=tensor'"):
    parallel.make_rules("dp", "hidden=tensor")
  with pytest.raises(ValueError, match="names mesh axis 'model'"):
    parallel.make_rules("dp", "mlp=model")


def test_state_is_created_sharded_with_optimizer_state_like_params():
  mesh = parallel.make_mesh({"fsdp": 2, "tensor": 2, "data": 2})
  rules = parallel.make_rules("fsdp_tp")
  tx = optax.adafactor(1e-3, min_dim_size_to_factor=8)
  _, state, shardings = init_train_state(lambda rngs: DecoderLM(CONFIG, rngs=rngs), tx, 0, mesh, rules)
  embedding = state.params["embedder"]["token"]["embedding"]
  assert embedding.sharding.spec == P("tensor", "fsdp")
  assert embedding.addressable_shards[0].data.shape == (32, 16)
  up = state.params["decoder"]["layers"]["mlp"]["up"]["kernel"]
  assert up.shape == (2, 32, 64) and up.sharding.spec == P(None, "fsdp", "tensor")
  # Adafactor keeps unfactored statistics for vectors (sharded like them) and row/column factors
  # for matrices (replicated); every leaf carries the sharding computed for it.
  for leaf, sharding in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(shardings.opt_state)):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  scale = state.params["decoder"]["final_norm"]["scale"]
  specs = {s.spec for leaf in jax.tree.leaves(state.opt_state) for s in [leaf.sharding]
           if leaf.shape == scale.shape}
  assert P("fsdp") in specs


def test_indivisible_parameter_is_a_clear_error():
  mesh = parallel.make_mesh({"tensor": 8})
  rules = parallel.make_rules("tp")
  with pytest.raises(ValueError, match=r"parameter .*kv_heads|dimension 2 is not divisible by 8"):
    init_train_state(lambda rngs: DecoderLM(CONFIG, rngs=rngs), optax.sgd(0.1), 0, mesh, rules)


def test_global_batch_shards_rows_and_sequence():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "context": 2})
  rules = parallel.make_rules("context")
  tokens = np.arange(8 * 6, dtype=np.int32).reshape(8, 6)
  shardings = parallel.batch_shardings({"inputs": tokens.shape, "labels": (8,)}, mesh, rules)
  batch = parallel.global_batch({"inputs": tokens, "labels": tokens[:, 0]}, shardings)
  assert batch["inputs"].sharding.spec == P(("data", "fsdp"), "context")
  assert batch["inputs"].addressable_shards[0].data.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(batch["inputs"]), tokens)
  with pytest.raises(ValueError, match=r"batch\['inputs'\] of shape \(6, 6\)"):
    parallel.batch_shardings({"inputs": (6, 6)}, mesh, rules)
