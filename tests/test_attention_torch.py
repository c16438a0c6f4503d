"""Parity with `torch.nn.functional.scaled_dot_product_attention` (float32), forward and gradients.

Covers what SDPA can express: no mask, causal with q_len == kv_len (SDPA aligns causal masks at the
start, flaxattn at the end; they agree only for square attention), a boolean mask, GQA via
`enable_gqa=True`, and an explicit scale. Every implementation declaring the features is checked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_support import assert_close, supporting
from flaxattn.attention import Mask, dot_product_attention

torch = pytest.importorskip("torch", reason="PyTorch is the reference for the SDPA parity tests")

# Both sides compute in float32 (a few ulp per op); see attention_support.assert_close for the scale.
TOLERANCE = 1e-5

# name: (batch, q_len, kv_len, heads, kv_heads, head_dim, value_dim, causal, boolean mask, scale)
CASES = {
    "no_mask": (2, 9, 11, 4, 4, 8, 8, False, False, None),
    "causal": (2, 9, 9, 4, 4, 8, 8, True, False, None),
    "bool_mask": (2, 7, 12, 2, 2, 8, 6, False, True, None),
    "gqa": (2, 9, 9, 4, 2, 8, 8, False, False, None),
    "mqa_causal_bool_scale": (1, 10, 10, 4, 1, 16, 16, True, True, 0.3),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_torch_sdpa(case):
  batch, q_len, kv_len, heads, kv_heads, head_dim, value_dim, causal, with_array, scale = CASES[case]
  rng = np.random.default_rng(0)
  query = rng.normal(size=(batch, q_len, heads, head_dim)).astype(np.float32)
  key = rng.normal(size=(batch, kv_len, kv_heads, head_dim)).astype(np.float32)
  value = rng.normal(size=(batch, kv_len, kv_heads, value_dim)).astype(np.float32)
  d_out = rng.normal(size=(batch, q_len, heads, value_dim)).astype(np.float32)
  array = None
  if with_array:
    array = rng.random((batch, 1, q_len, kv_len)) < 0.6
    array[..., 0] = True  # SDPA gives NaN for a query that sees no key; keep one key per row.

  # torch takes [batch, heads, length, dim].
  torch_inputs = [torch.tensor(x.transpose(0, 2, 1, 3), requires_grad=True)
                  for x in (query, key, value)]
  torch_out = torch.nn.functional.scaled_dot_product_attention(
      *torch_inputs, attn_mask=None if array is None else torch.tensor(array), is_causal=causal,
      scale=scale, enable_gqa=kv_heads != heads)
  torch_out.backward(torch.tensor(d_out.transpose(0, 2, 1, 3)))
  expected = [torch_out.detach().numpy().transpose(0, 2, 1, 3)]
  expected += [x.grad.numpy().transpose(0, 2, 1, 3) for x in torch_inputs]

  kinds = [kind for kind, on in (("causal", causal), ("array", with_array)) if on]
  # A plain boolean array is accepted as the mask too (as torch's attn_mask).
  mask = jnp.asarray(array) if with_array and not causal else Mask(
      causal=causal, array=None if array is None else jnp.asarray(array))
  for implementation in supporting(masks=kinds):
    @jax.jit
    def forward_and_vjp(query, key, value, d_out, implementation=implementation):
      def attend(query, key, value):
        return dot_product_attention(query, key, value, mask=mask, scale=scale,
                                     implementation=implementation)

      out, vjp = jax.vjp(attend, query, key, value)
      return [out, *vjp(d_out)]

    actual = forward_and_vjp(*(jnp.asarray(x) for x in (query, key, value, d_out)))
    for name, got, want in zip(("output", "dquery", "dkey", "dvalue"), actual, expected):
      assert_close(got, want, TOLERANCE, f"{name} of {implementation} on {case}")
