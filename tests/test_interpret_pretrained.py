"""Head ablation on a real checkpoint: zero-ablating one head of all-MiniLM-L6-v2 in flaxattn equals
transformers' BertModel with that head's output zeroed (a forward pre-hook on the layer's attention
output projection, whose input is the heads' outputs side by side)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch runs the transformers reference")
transformers = pytest.importorskip("transformers", reason="transformers' BertModel is the reference")

from flaxattn.interpret import ablate_head, run_with_interventions  # noqa: E402
from test_pretrained_bert import SENTENCES, loaded, model_dir  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4  # absolute, on last hidden states (values of magnitude up to ~10)


def torch_hidden(directory, ids, mask, ablated=None):
  """transformers' last hidden states, with head `ablated=(layer, head)`'s output zeroed."""
  model = transformers.AutoModel.from_pretrained(str(directory)).eval()
  handle = None
  if ablated is not None:
    layer, head = ablated
    width = model.config.hidden_size // model.config.num_attention_heads

    def zero_head(module, args):
      (context,) = args
      context = context.clone()
      context[..., head * width:(head + 1) * width] = 0.0
      return (context,)

    handle = model.encoder.layer[layer].attention.output.dense.register_forward_pre_hook(zero_head)
  with torch.no_grad():
    hidden = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                   attention_mask=torch.as_tensor(mask, dtype=torch.long)).last_hidden_state
  if handle is not None:
    handle.remove()
  return hidden.numpy()


def test_zero_ablating_a_head_matches_transformers(loaded, model_dir):  # noqa: F811
  model, tokenizer = loaded
  ids, mask = tokenizer.encode_batch(SENTENCES)
  mask = np.asarray(mask, bool)
  layer, head = 3, 5
  got = np.asarray(run_with_interventions(model, ids, attention_mask=mask,
                                          interventions=[ablate_head(layer, head)]))
  want = torch_hidden(model_dir, ids, mask, ablated=(layer, head))
  np.testing.assert_allclose(got[mask], want[mask], rtol=0, atol=TOLERANCE)
  clean = torch_hidden(model_dir, ids, mask)
  assert np.abs(want[mask] - clean[mask]).max() > 100 * TOLERANCE  # the ablation is visible
