"""Test setup: 8 simulated CPU devices, configured before any backend use."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
