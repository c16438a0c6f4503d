"""flaxattn: self-attention sequence models in JAX and Flax NNX."""

__version__ = "0.1.0"
