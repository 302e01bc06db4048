"""One mesh with named axes (`data`, `fsdp`, `tensor`) and the helper that constrains activations.

Batches are split over the data axes (`data` x `fsdp`); `shard` is a no-op when no mesh is set, so the
same model code runs on one device and on a slice.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def _resolve(name, mesh_axes):
    """Logical name -> mesh axes present: `data` means every data-parallel axis."""
    if name is None:
        return None
    names = BATCH_AXES if name == "data" else (name,)
    present = tuple(n for n in names if n in mesh_axes)
    return present or None


def shard(x: jax.Array, spec: tuple) -> jax.Array:
    """Constrains `x` to `spec` (logical names) under the current mesh; identity without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, P(*(_resolve(n, mesh.axis_names) for n in spec)))
