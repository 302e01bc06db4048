"""klq_jax: online RLHF of language models with KL-regularised Q-learning (KLQ) and PPO, in JAX/Flax."""

__version__ = "0.1.0"
