"""`python -m klq_jax.main --config=configs/dialogue.py[:variant] [--config.key=value ...] [--workdir=DIR]`

Trains with KLQ or PPO (`--config.algo`), resuming from the workdir's last checkpoint. Bad input ends
with one line on stderr naming the value and what is accepted, and exit status 2 (set KLQ_JAX_DEBUG=1
for the full traceback).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/dialogue.py[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (default: runs/<task>-<algo>-<config hash>).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; accepted: --config, --config.<key>, --workdir")
    from klq_jax.allocator import keep_freed_memory

    keep_freed_memory()  # before JAX starts its threads (see klq_jax/allocator.py)
    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    from klq_jax import trainer

    config = _CONFIG.value
    workdir = _WORKDIR.value or trainer.default_workdir(config, flags.FLAGS["config"].config_filename)
    metrics = trainer.train(config, workdir)
    if jax.process_index() == 0:
        shown = {k: round(metrics[k], 4) for k in ("rollout/reward", "rollout/kl", "rollout/objective") if k in metrics}
        print(f"done: {workdir} {shown}")


def run():
    """Entry point with the one-line error contract for user errors."""
    argv = sys.argv
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as e:  # bad values, unknown flags
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config lacks
        key = str(e).strip("'\"")
        given = [a for a in argv if a.startswith("--config.") and key in a.split("=")[0]]
        print(f"error: unknown config key {key!r} in {given[0] if given else argv}; accepted: the keys of the "
              "config file (printed in <workdir>/config.json of any run)", file=sys.stderr)
        sys.exit(2)
    if _CONFIG.value is None:
        print("error: --config is required; accepted: a config file such as configs/dialogue.py[:variant]",
              file=sys.stderr)
        sys.exit(2)
    try:
        main(remaining)
    except (ValueError, FloatingPointError, ImportError, OSError) as e:
        if os.environ.get("KLQ_JAX_DEBUG"):  # the full traceback, for bug reports
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from klq_jax.allocator import restart_with_huge_pages

    restart_with_huge_pages(["-m", "klq_jax.main", *sys.argv[1:]])  # first: glibc reads it at start-up only
    run()
