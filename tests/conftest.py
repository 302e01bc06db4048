"""Shared test setup: CPU, fp32 matmuls at full precision so parity checks with PyTorch are exact."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
