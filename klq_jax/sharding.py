"""One mesh with named axes (`data`, `fsdp`, `tensor`), the rules that shard parameters on it, and the
helpers that move batches between a process's rows and the global, sharded arrays.

Axes:
    data    pure data parallelism: parameters replicated, batch split.
    fsdp    the batch is split over it too, and parameters are split over their model dimension
            (ZeRO-3 / FSDP: every layer's weights are all-gathered for its matmuls).
    tensor  Megatron-style tensor parallelism: heads, MLP hidden units and the vocabulary are split.

Parameters get shardings from two tables (the maxtext habit): `PARAM_RULES` maps a parameter's dotted
path (regex on its tail: `blocks.wq_dnh`, `embed_vd`, ...) to logical axes (`layers`, `embed`, `heads`,
...), and `LOGICAL_RULES` maps logical axes to mesh axes. A dimension whose size the mesh axes do not
divide stays replicated (e.g. 2 KV heads over `tensor=4`), and the layer axis is never split. The same
rules apply to the optimiser state (its paths end with the parameter's path), so Adam moments are
sharded like the parameters they follow.

Batches are split over the data axes (`data` x `fsdp`) on their leading dimension. `shard` constrains
activations inside the model; it is a no-op when no mesh is set, so the same model code runs on one
device and on a slice. Typical use (see docs/scaling.md):

    mesh = make_mesh(config.mesh)
    state = place_state(state, mesh)                       # parameters and AdamW moments by the rules
    with jax.set_mesh(mesh):                               # activates `shard` inside traced model code
        step = shard_train_step(train_step, state, mesh)   # jit with in/out shardings, state donated
        state, metrics = step(state, to_global(my_rows, mesh))  # each process passes its own rows
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes (a name, a tuple of names, or None for replicated).
LOGICAL_RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "layers": None,      # the scanned layer axis: never split (scan slices it every step)
    "embed": "fsdp",     # model dimension d of weights: FSDP
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "positions": None,
    "norm": None,
}

# Parameter path (regex on the dotted path's tail) -> logical axes, one per dimension. Every decoder
# family (Llama/Qwen2/SmolLM2, GPT-NeoX, GPT-2) and head uses these names (klq_jax/models/transformer.py).
PARAM_RULES: tuple[tuple[str, tuple], ...] = (
    (r"embed_vd", ("vocab", "embed")),
    (r"pos_embed_pd", ("positions", "embed")),
    (r"lm_head_dv", ("embed", "vocab")),
    (r"blocks\.wq_dnh", ("layers", "embed", "heads", "head_dim")),
    (r"blocks\.w[kv]_dkh", ("layers", "embed", "kv_heads", "head_dim")),
    (r"blocks\.wo_nhd", ("layers", "heads", "head_dim", "embed")),
    (r"blocks\.bq_nh", ("layers", "heads", "head_dim")),
    (r"blocks\.b[kv]_kh", ("layers", "kv_heads", "head_dim")),
    (r"blocks\.w_(gate|up)_df", ("layers", "embed", "mlp")),
    (r"blocks\.w_down_fd", ("layers", "mlp", "embed")),
    (r"blocks\.b_up_f", ("layers", "mlp")),
    (r"blocks\.(b_down_d|bo_d|ln[12]_(scale|bias))", ("layers", "norm")),
    (r"(final_(scale|bias)|value_w_d|score_w_d)", ("norm",)),
    (r"(value_b|score_b)", ()),
)

# Logical axes of activations and caches (for `shard` and for placing inputs).
KV_CACHE_AXES = ("layers", "batch", "kv_heads", None, "head_dim")  # KVCache.k_lbksh / v_lbksh


class MeshError(ValueError):
    """A mesh config that does not fit the devices, or a batch that does not split over the mesh."""


# ----------------------------------------------------------------------------- activations


def _resolve(name, mesh_axes):
    """Logical name -> mesh axes present: `data`/`batch` mean every data-parallel axis."""
    if name is None:
        return None
    names = BATCH_AXES if name in ("data", "batch") else (name,)
    present = tuple(n for n in names if n in mesh_axes)
    return present or None


def shard(x: jax.Array, spec: tuple) -> jax.Array:
    """Constrains `x` to `spec` (logical names) under the current mesh; identity without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, P(*(_resolve(n, mesh.axis_names) for n in spec)))


# ----------------------------------------------------------------------------- the mesh


def _mesh_sizes(mesh_cfg) -> dict[str, int]:
    if mesh_cfg is None:
        return {"data": -1, "fsdp": 1, "tensor": 1}
    if isinstance(mesh_cfg, str):  # "2,2,2" or "data=2,fsdp=4"
        parts = [p.strip() for p in mesh_cfg.split(",") if p.strip()]
        try:
            if all("=" in p for p in parts):
                mesh_cfg = {k.strip(): int(v) for k, v in (p.split("=", 1) for p in parts)}
            else:
                mesh_cfg = [int(p) for p in parts]
        except ValueError:
            raise MeshError(f"mesh={mesh_cfg!r}; accepted: three integer sizes 'data,fsdp,tensor' such as "
                            "'2,2,2', or 'data=2,fsdp=-1'") from None
    if isinstance(mesh_cfg, (list, tuple)):
        if len(mesh_cfg) != len(MESH_AXES):
            raise MeshError(f"mesh={tuple(mesh_cfg)!r}; accepted: {len(MESH_AXES)} sizes for {MESH_AXES}")
        return dict(zip(MESH_AXES, (int(s) for s in mesh_cfg)))
    get = mesh_cfg.get if hasattr(mesh_cfg, "get") else lambda k, d: getattr(mesh_cfg, k, d)
    keys = set(mesh_cfg.keys()) if hasattr(mesh_cfg, "keys") else set(MESH_AXES)
    unknown = sorted(keys - set(MESH_AXES))
    if unknown:
        raise MeshError(f"unknown mesh axis {unknown[0]!r}; accepted: {MESH_AXES}")
    try:
        return {name: int(get(name, 1)) for name in MESH_AXES}
    except (TypeError, ValueError):
        raise MeshError(f"mesh {dict((k, get(k, 1)) for k in MESH_AXES)}: sizes must be integers") from None


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """Axis sizes `(data, fsdp, tensor)` for `num_devices`; one size may be -1 ("the remaining devices").

    `mesh_cfg`: a mapping/ConfigDict with keys `data`, `fsdp`, `tensor`, a sequence of three sizes, a
    string "2,2,2" or "data=2,fsdp=4", or None (all devices on `data`)."""
    sizes = _mesh_sizes(mesh_cfg)
    free = [k for k, v in sizes.items() if v == -1]
    bad = [k for k, v in sizes.items() if v == 0 or v < -1]
    if bad or len(free) > 1:
        raise MeshError(f"mesh {sizes}: sizes must be positive, with at most one -1 (the remaining devices)")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise MeshError(f"mesh {sizes}: the fixed axes ({fixed} devices) do not divide the {num_devices} "
                            f"devices; accepted: sizes whose product divides {num_devices}")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(f"mesh {sizes} has {fixed} devices but {num_devices} are available; accepted: sizes whose "
                        f"product is {num_devices}, or -1 on one axis")
    return tuple(sizes[k] for k in MESH_AXES)


def make_mesh(mesh_cfg=None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` over all (global) devices with axes `MESH_AXES`, from `config.mesh`.

    Axes are `Auto` (the compiler propagates shardings from the annotated inputs and `shard` calls),
    not JAX's explicit sharding-in-types. Device order comes from `jax.make_mesh`, which lays out TPU
    slices by their physical topology; put `tensor` within a host (it is the innermost axis).
    With several processes, the batch axes must cover the processes: every process then owns distinct
    batch rows (a contiguous block on the usual layouts), which `to_global` fills from the process's
    rows in order and `to_host_local` reads back in the same order."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    processes = len({d.process_index for d in devices})
    if processes > 1 and (shape[0] * shape[1]) % processes:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, shape))}: data*fsdp={shape[0] * shape[1]} must be a multiple "
                        f"of the {processes} processes; accepted: `tensor` within one host")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def axis_sizes(mesh) -> dict[str, int]:
    """`{axis: size}` of a `Mesh`, an `AbstractMesh` or a plain mapping."""
    if isinstance(mesh, Mapping):
        return dict(mesh)
    return dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes") else mesh.devices.shape))


def batch_divisor(mesh) -> int:
    """How many ways the batch is split: the product of the data axes' sizes."""
    sizes = axis_sizes(mesh)
    return math.prod(sizes.get(a, 1) for a in BATCH_AXES)


def check_batch(batch_size: int, mesh, *, num_minibatches: int = 1, num_microbatches: int = 1,
                process_count: int | None = None) -> None:
    """Raises a one-line `MeshError` unless the rollout batch splits over the processes and the rollout
    batch, each minibatch and each microbatch split evenly over the data axes (`data` x `fsdp`)."""
    n = batch_divisor(mesh)
    process_count = jax.process_count() if process_count is None else process_count
    need = math.lcm(n * num_minibatches * num_microbatches, process_count)
    if batch_size % need:
        raise MeshError(f"batch_size={batch_size} does not split into {num_minibatches} minibatches x "
                        f"{num_microbatches} microbatches over {n} data-parallel devices (mesh data*fsdp) and "
                        f"{process_count} processes; accepted: a multiple of {need}")


# ----------------------------------------------------------------------------- parameter rules


def path_str(path) -> str:
    """Dotted name of a pytree key path: `params.blocks.wq_dnh` (a trailing NNX `.value` dropped)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    if parts and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return ".".join(parts)


_COMPILED: dict[tuple, list] = {}


def _compiled(rules):
    key = tuple((pattern, tuple(axes)) for pattern, axes in rules)
    if key not in _COMPILED:
        _COMPILED[key] = [(re.compile(r"(?:^|\.)(?:" + pattern + r")$"), axes) for pattern, axes in rules]
    return _COMPILED[key]


def logical_axes(path: str, ndim: int, rules=PARAM_RULES) -> tuple | None:
    """The logical axes of the parameter at dotted `path` (first matching rule), or None if no rule
    matches. A rule whose length differs from `ndim` does not match (e.g. an Adam `count` scalar)."""
    for regex, axes in _compiled(rules):
        if regex.search(path) and len(axes) == ndim:
            return tuple(axes)
    return None


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh,
             logical_rules: Mapping[str, Any] = LOGICAL_RULES) -> P:
    """PartitionSpec for an array with `logical` axes and `shape` on `mesh`: each logical axis maps to
    its mesh axes (those of size 1 or absent dropped); a dimension they do not divide stays replicated,
    and no mesh axis is used twice."""
    sizes = axis_sizes(mesh)
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        target = logical_rules.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(a for a in names if sizes.get(a, 1) > 1 and a not in used)
        if not names or dim % math.prod(sizes[a] for a in names):
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def param_specs(tree, mesh, rules=PARAM_RULES, logical_rules: Mapping[str, Any] = LOGICAL_RULES):
    """PartitionSpecs for every leaf of `tree` (params, optimiser state, a TrainState, abstract or
    concrete), by `rules` on the leaf's dotted path; leaves no rule matches are replicated."""
    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        axes = logical_axes(path_str(path), len(shape), rules)
        return P() if axes is None else spec_for(axes, shape, mesh, logical_rules)
    return jax.tree_util.tree_map_with_path(one, tree)


def param_shardings(tree, mesh: Mesh, rules=PARAM_RULES, logical_rules: Mapping[str, Any] = LOGICAL_RULES):
    """`NamedSharding`s on `mesh` for every leaf of `tree` (see `param_specs`). Works on a TrainState
    (step, params, opt_state, kl_coef), on NNX params and on `jax.eval_shape` results."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(tree, mesh, rules, logical_rules),
                        is_leaf=lambda x: isinstance(x, P))


state_shardings = param_shardings  # the same rules cover a whole TrainState


def unmatched(tree, rules=PARAM_RULES, min_ndim: int = 2) -> list[str]:
    """Dotted paths of leaves with `ndim >= min_ndim` that no rule matches (they would be replicated)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) >= min_ndim and logical_axes(path_str(path), len(shape), rules) is None:
            out.append(path_str(path))
    return out


def per_device_bytes(tree, mesh, rules=PARAM_RULES, logical_rules: Mapping[str, Any] = LOGICAL_RULES) -> int:
    """Bytes of `tree` held by one device when sharded by the rules (abstract leaves are fine)."""
    sizes = axis_sizes(mesh)
    specs = param_specs(tree, mesh, rules, logical_rules)
    total = 0
    for leaf, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        shape = list(getattr(leaf, "shape", ()))
        for i, axes in enumerate(spec):
            for a in (axes,) if isinstance(axes, str) else tuple(axes or ()):
                shape[i] //= sizes[a]
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


# ----------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) dimension split over `data` x `fsdp`, the others replicated: for arrays of any
    rank, and as a jit in/out sharding for a whole batch pytree (a Rollout: every field leads with B)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def kv_cache_spec(mesh, shape: Sequence[int]) -> P:
    """Spec of a KVCache array `[L, B, K, S, hd]`: batch over the data axes, KV heads over `tensor`."""
    return spec_for(KV_CACHE_AXES, shape, mesh)


# ----------------------------------------------------------------------------- placing data


_COPIES: dict = {}


def _copy_to(sharding):
    if sharding not in _COPIES:
        _COPIES[sharding] = jax.jit(lambda y: y, out_shardings=sharding)
    return _COPIES[sharding]


def _put(x, sharding: NamedSharding):
    """Puts a value every process holds in full onto `sharding` (each device receives only its shard)."""
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if not x.is_fully_addressable or len(x.sharding.device_set) > 1:
            return _copy_to(sharding)(x)  # already spread over devices: reshard on device
    # One device (or host memory: weights loaded under `jax.default_device(cpu)`): through the host, so each
    # device receives only its shard and the result never aliases `x` (with `device_put`, the shard on x's
    # device can share its buffer, and donating the result to the train step would delete `x` too).
    host = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(tree, shardings):
    """Puts every leaf of `tree` onto its sharding in `shardings` (a matching tree, or one sharding for
    all). Leaves may be host arrays or single-device arrays that every process holds in full (weights
    read from a checkpoint on each host), or global arrays to reshard."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: _put(x, shardings), tree)
    return jax.tree.map(_put, tree, shardings)


def place_state(state, mesh: Mesh, rules=PARAM_RULES):
    """A TrainState / params tree placed on `mesh` by the parameter rules."""
    return place(state, param_shardings(state, mesh, rules))


def create_train_state(params, optimizer, kl_coef, mesh: Mesh, rules=PARAM_RULES):
    """`TrainState.create(params, optimizer, kl_coef)` built on the mesh: the parameters are placed by the
    rules, and the optimiser state is created by a jit whose outputs already have their shardings, so no
    device ever holds the whole AdamW state (`TrainState.create` on unplaced parameters would allocate
    it in full on their device)."""
    from klq_jax.rl.train_step import TrainState  # local: train_step is above this module

    def create(p):
        return TrainState.create(p, optimizer, kl_coef)

    params = place_state(params, mesh, rules)
    shardings = param_shardings(jax.eval_shape(create, params), mesh, rules)
    return jax.jit(create, out_shardings=shardings, donate_argnums=0)(params)


def to_global(tree, mesh: Mesh):
    """This process's batch rows (host or local arrays) -> global arrays split over the data axes.

    Every process calls it with its own rows, in process order (process `i` holds rows
    `[i * B / n, (i + 1) * B / n)` of the global batch, as `PromptStream` hands them out). With one
    process it is a `device_put`."""
    def one(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)
    return jax.tree.map(one, tree)


def to_host_local(tree, mesh: Mesh | None = None):
    """Global batch-split arrays -> this process's rows as numpy (the inverse of `to_global`).
    Fully addressable arrays (one process) come back whole."""
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        pieces: dict[int, np.ndarray] = {}
        for shard_ in x.addressable_shards:
            start = (shard_.index[0].start or 0) if shard_.index else 0
            pieces.setdefault(start, np.asarray(shard_.data))
        rows = [pieces[k] for k in sorted(pieces)]
        # Replicas over non-batch axes share a start; shards of non-leading axes are not expected here.
        out = np.concatenate(rows, axis=0)
        if out.shape[1:] != x.shape[1:]:
            raise MeshError(f"to_host_local expects arrays split over the batch axis only; got {x.sharding}")
        return out
    return jax.tree.map(one, tree)


def gather_to_host(tree):
    """Every leaf as a whole numpy array on every process (an all-gather into host memory: for exporting
    or comparing parameters; the device memory stays sharded)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return to_host_local(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(one, tree)


def local_mesh(mesh_cfg=None) -> Mesh:
    """A mesh over this process's devices only (default: all on `fsdp`), for models every process runs on
    its own rows, such as a learned reward model scoring the host's share of the batch."""
    return make_mesh(mesh_cfg or {"data": 1, "fsdp": -1, "tensor": 1}, devices=jax.local_devices())


# ----------------------------------------------------------------------------- jitting with shardings


def shard_train_step(train_step: Callable, state, mesh: Mesh, *, donate: bool = True, rules=PARAM_RULES):
    """`jax.jit(train_step)` with explicit shardings: the state by the rules, in and out (so the donated
    buffers are reused in place), the batch over the data axes, the metrics replicated.

    `train_step(state, batch) -> (state, metrics)` is the un-jitted step of
    `klq_jax.rl.train_step.make_train_step(..., jit=False)`; `state` (concrete or `jax.eval_shape`)
    gives the shardings. Call the result under `with jax.set_mesh(mesh)` so `shard` in the model applies.
    (The loop's own `make_update` needs no wrapper: jitted on placed inputs, it keeps these shardings.)"""
    state_sharding = param_shardings(state, mesh, rules)
    return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding(mesh)),
                   out_shardings=(state_sharding, replicated(mesh)), donate_argnums=(0,) if donate else ())


# ----------------------------------------------------------------------------- loop glue


def global_sample(sampler, state, prompts, rng, mesh: Mesh, *, prompt_length: int | None = None,
                  max_new_tokens: int | None = None, temperature: float | None = None):
    """`Sampler.__call__` on a mesh: this process's prompts are padded on the host, made global over the
    data axes, and the whole batch is decoded in one jit (the KV cache follows the batch split). Returns
    a `SampleOutput` of global arrays. With one process and no mesh it equals `sampler(...)`."""
    tokens, mask = sampler.pad_prompts(prompts, prompt_length)
    tokens_bp, mask_bp = to_global((tokens, mask), mesh)
    return sampler.generate_padded(state, tokens_bp, mask_bp, rng, max_new_tokens=max_new_tokens,
                                   temperature=temperature,
                                   unstack_layers=sampler.unstack_layers and weights_whole(mesh))


def weights_whole(mesh) -> bool:
    """Whether every device holds whole weights (no `fsdp` or `tensor` split)."""
    sizes = axis_sizes(mesh)
    return sizes.get("fsdp", 1) == 1 and sizes.get("tensor", 1) == 1


def global_reward_fn(reward_fn: Callable, mesh: Mesh) -> Callable:
    """Wraps a host reward `reward_fn(prompt_batch, rollout_of_this_process's_rows) -> rewards` for the loop:
    the rollout's global arrays are brought to this process's rows (numpy) first, and the rewards go
    back as a global array over the data axes. Each process scores only its own rows."""
    def wrapped(prompt_batch, batch):
        local = to_host_local(batch, mesh)
        rewards = np.asarray(reward_fn(prompt_batch, local), np.float32)
        return to_global(rewards, mesh)
    return wrapped
