"""LSTM / GRU against torch.nn.LSTM / torch.nn.GRU with copied weights and packed padded sequences;
the recurrent + attention encoder's padding invariance and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxattn.nn.recurrent import GRU, LSTM, RecurrentAttentionEncoder

RNG = np.random.default_rng(4)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_matches_torch_bidirectional_with_padding(kind):
  torch = pytest.importorskip("torch", reason="torch.nn.LSTM/GRU are the references")
  torch.manual_seed(0)
  ref = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](5, 6, batch_first=True, bidirectional=True)
  ours = {"lstm": LSTM, "gru": GRU}[kind](5, 6, bidirectional=True, rngs=nnx.Rngs(0))
  gates = 4 if kind == "lstm" else 3
  for cell, suffix in ((ours.forward, ""), (ours.backward, "_reverse")):
    get = lambda name: getattr(ref, name + suffix).detach().numpy()
    cell.input_kernel[...] = jnp.asarray(get("weight_ih_l0").T.reshape(5, gates, 6))
    cell.recurrent_kernel[...] = jnp.asarray(get("weight_hh_l0").T.reshape(6, gates, 6))
    cell.input_bias[...] = jnp.asarray(get("bias_ih_l0").reshape(gates, 6))
    cell.recurrent_bias[...] = jnp.asarray(get("bias_hh_l0").reshape(gates, 6))
  x = RNG.normal(size=(3, 7, 5)).astype(np.float32)
  lengths = np.array([7, 4, 1])
  packed = torch.nn.utils.rnn.pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(lengths),
                                                   batch_first=True, enforce_sorted=False)
  want, state = ref(packed)
  want, _ = torch.nn.utils.rnn.pad_packed_sequence(want, batch_first=True, total_length=7)
  want_final = (state[0] if kind == "lstm" else state).detach().numpy().transpose(1, 0, 2)
  valid = np.arange(7)[None, :] < lengths[:, None]
  out, final = jax.jit(lambda x, v: ours(x, v))(jnp.asarray(x), jnp.asarray(valid))
  np.testing.assert_allclose(out, want.detach().numpy(), atol=1e-5)  # float32 both sides
  np.testing.assert_allclose(final, want_final, atol=1e-5)


def test_recurrent_attention_encoder_padding_invariance_and_grad():
  model = RecurrentAttentionEncoder(20, 8, 6, num_heads=2, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda state, ids, valid: nnx.merge(graphdef, state)(ids, valid))
  ids = np.array([[3, 4, 5, 0, 0], [6, 7, 8, 9, 10]])
  valid = ids > 0
  sequence, pooled = run(state, ids, valid)
  assert sequence.shape == (2, 5, 12) and pooled.shape == (2, 12)
  _, alone = run(state, ids[:1, :3], valid[:1, :3])
  np.testing.assert_allclose(pooled[0], alone[0], atol=1e-5)
  grads = jax.jit(jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(ids, valid)[1] ** 2)))(state)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["recurrent"]["backward"]["recurrent_kernel"][...]).sum()) > 0
