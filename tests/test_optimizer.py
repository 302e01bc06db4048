"""`clipped_adamw` (the trainer's optimiser) against optax's `chain(clip_by_global_norm, adamw)`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from klq_jax.rl.optimizer import clipped_adamw, global_norm
from klq_jax.rl.train_step import default_optim_config, make_optimizer


def _params(rng):
    return {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0, 50.0])
@pytest.mark.parametrize("mu_dtype", [None, jnp.bfloat16])
def test_equals_optax_clip_then_adamw(max_grad_norm, mu_dtype):
    """Five steps on summed gradients with grad_scale = 1/count: the same parameters and moments as optax on
    the divided gradients (warmup schedule, masked weight decay, clipping that triggers on some steps). With a
    bfloat16 first moment the moments are optax's, and the parameters take the AdamW step from the moments as
    stored."""
    rng = np.random.default_rng(0)
    params = _params(rng)
    schedule = optax.linear_schedule(0.0, 1e-2, 3)
    mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
    ours = clipped_adamw(schedule, b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.1, decay_mask=mask,
                         max_grad_norm=max_grad_norm, mu_dtype=mu_dtype)
    adamw = optax.adamw(schedule, b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.1, mask=mask, mu_dtype=mu_dtype)
    theirs = optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw) if max_grad_norm else adamw
    p_ours, s_ours = params, ours.init(params)
    p_theirs, s_theirs = params, theirs.init(params)
    for step in range(5):  # both jitted: XLA:CPU may keep a bf16 product in float32 inside a fusion
        count = float(3 + step)
        grads_sum = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * count * (1 + 3 * step), x.dtype),
                                 params)
        p_before = p_ours
        p_ours, s_ours = jax.jit(ours.apply)(grads_sum, s_ours, p_ours, 1.0 / count)
        updates, s_theirs = jax.jit(theirs.update)(jax.tree.map(lambda g: g / count, grads_sum), s_theirs, p_theirs)
        p_theirs = optax.apply_updates(p_theirs, updates)
        if mu_dtype is None:
            expected = p_theirs
        else:  # the step reads the bf16 moment as stored (optax reads it before rounding): numpy from the state
            lr, c1, c2 = float(schedule(step)), 1 - 0.9 ** (step + 1), 1 - 0.99 ** (step + 1)
            expected = jax.tree.map(
                lambda p, mu, nu, decays: p - lr * ((np.float32(mu) / c1) / (np.sqrt(np.float32(nu) / c2) + 1e-6)
                                                    + (0.1 * p if decays else 0.0)),
                p_before, s_ours.mu, s_ours.nu, mask(p_before))
        for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    adam = (s_theirs[1] if max_grad_norm else s_theirs)[0]
    assert int(s_ours.count) == int(adam.count) == 5
    for a, b in zip(jax.tree.leaves((s_ours.mu, s_ours.nu)), jax.tree.leaves((adam.mu, adam.nu))):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-8)


def test_make_optimizer_checks_mu_dtype():
    cfg = default_optim_config()
    cfg.mu_dtype = "float16"
    with pytest.raises(ValueError, match="mu_dtype='float16'"):
        make_optimizer(cfg)


def test_bf16_first_moment_adds_no_temporaries():
    """The step reads each moment once, as stored, so XLA updates it in place: a bfloat16 `mu` needs no more
    temporaries than a float32 one (with optax's order, reading the float32 value before rounding, XLA:CPU
    kept a float32 copy of the moments beside the bf16 ones)."""
    params = {"w": jnp.zeros((512, 1024), jnp.float32), "v": jnp.zeros((2048,), jnp.float32)}
    grads = jax.tree.map(jnp.ones_like, params)

    def temp_bytes(mu_dtype):
        opt = clipped_adamw(1e-3, max_grad_norm=1.0, weight_decay=0.1, mu_dtype=mu_dtype)
        step = jax.jit(opt.apply, donate_argnums=(0, 1, 2))  # in the train step all three are its own buffers
        compiled = step.lower(grads, opt.init(params), params, 0.5).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    w_bytes = 512 * 1024 * 4
    assert temp_bytes(jnp.bfloat16) <= temp_bytes(jnp.float32) < w_bytes / 4


def test_bf16_gradients_read_as_their_fp32_values():
    """Gradients in bfloat16 (the layers' weight gradients with bf16 matmul operands) take the same step as their
    float32 values, and `global_norm` sums their squares in float32 (optax's on the widened values)."""
    rng = np.random.default_rng(1)
    params = {"stack": jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
    grads16 = {"stack": jnp.asarray(rng.normal(size=(3, 4, 5)) * 40, jnp.bfloat16),
               "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
    grads32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads16)
    np.testing.assert_allclose(global_norm(grads16), optax.global_norm(grads32), rtol=1e-6)
    opt = clipped_adamw(1e-2, max_grad_norm=1.0, weight_decay=0.1, mu_dtype=jnp.bfloat16)
    state = opt.init(params)
    from16 = jax.jit(opt.apply)(grads16, state, params, 0.5)
    from32 = jax.jit(opt.apply)(grads32, state, params, 0.5)
    for x, y in zip(jax.tree.leaves(from16), jax.tree.leaves(from32)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))

