"""`python -m klq_jax.main --config=configs/dialogue.py[:variant] [--config.key=value ...] [--workdir=DIR]`

Trains with KLQ or PPO (`--config.algo`), resuming from the workdir's last checkpoint. Bad input ends
with one line on stderr naming the value and what is accepted, and exit status 2.
"""

from __future__ import annotations

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
        flags.FLAGS(argv)
    except flags.Error as e:  # unknown --config.x keys, bad values, missing --config
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    if _CONFIG.value is None:
        print("error: --config is required; accepted: a config file such as configs/dialogue.py[:variant]",
              file=sys.stderr)
        sys.exit(2)
    try:
        main(flags.FLAGS(argv, known_only=True))
    except (ValueError, FloatingPointError, ImportError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
