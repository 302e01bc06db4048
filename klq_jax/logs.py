"""Run logs: metrics as JSON lines, TensorBoard event files, a progress bar, and PNG curves.

`<workdir>/metrics.jsonl` holds one JSON object per iteration: ``{"iteration": it, name: float, ...}``
(`it` is the 0-based iteration index). Lines are appended and flushed as iterations finish. A run
resumed from a checkpoint of `S` completed iterations (the checkpoint's step) passes
``start_iteration=S``: lines of iterations ``>= S`` (written by the interrupted run after that
checkpoint, or a torn last line) are dropped, so the file always matches the run that produced the
final state. TensorBoard events go to `<workdir>/tensorboard/` with the same purge point.

Plots: ``plot_curves(runs, out_png)`` draws reward, KL and objective per iteration, one line per run
(label -> metrics.jsonl or workdir), e.g. KLQ vs PPO:

    python -m klq_jax.logs --out curves.png klq=runs/klq ppo=runs/ppo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# (label in the progress bar, metric key) pairs shown next to the bar.
DEFAULT_POSTFIX = (("reward", "rollout/reward"), ("kl", "rollout/kl"))
# (panel title, metric key) pairs of `plot_curves`.
DEFAULT_PLOT_KEYS = (("reward", "rollout/reward"), ("KL(pi || pi_ref)", "rollout/kl"),
                     ("objective (reward - beta KL)", "rollout/objective"))


class MetricsError(FloatingPointError):
    """A NaN/inf or non-numeric metric, or an unreadable metrics file. The message is one line."""


# ----------------------------------------------------------------------------------------------------
# The JSON-lines file.


def as_float_metrics(metrics: Mapping[str, Any], iteration: int) -> dict[str, float]:
    """`{name: float}`; raises `MetricsError` naming the first non-numeric or non-finite metric."""
    out: dict[str, float] = {}
    bad: list[str] = []
    for name, value in metrics.items():
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise MetricsError(f"metric {name!r} at iteration {iteration} is {type(value).__name__} "
                               f"{str(value)[:40]!r}; accepted: a number (a float or a scalar array)") from None
        if not math.isfinite(x):
            bad.append(f"{name}={x}")
        out[str(name)] = x
    if bad:
        more = f" (and {len(bad) - 1} more: {', '.join(bad[1:4])})" if len(bad) > 1 else ""
        raise MetricsError(f"non-finite metric {bad[0]} at iteration {iteration}{more}; the run diverged "
                           "or a reward/loss is undefined")
    return out


def _resolve_metrics_path(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    return path / METRICS_FILE if path.is_dir() else path


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """Records of a metrics.jsonl (or of a workdir holding one), in file order. A torn last line
    (a process killed mid-write) is skipped; a malformed line elsewhere raises `MetricsError`."""
    path = _resolve_metrics_path(path)
    if not path.is_file():
        raise MetricsError(f"metrics file {str(path)!r} does not exist; accepted: a metrics.jsonl or a "
                           "run workdir holding one")
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "iteration" not in rec:
                raise ValueError("not an object with an 'iteration' key")
        except ValueError as e:
            if i == len(lines) - 1:
                break  # torn final line
            raise MetricsError(f"{path}:{i + 1}: malformed metrics line ({e}); accepted: one JSON object "
                               "with an 'iteration' key per line") from None
        records.append(rec)
    return records


def truncate_metrics(path: str | os.PathLike, start_iteration: int) -> int:
    """Drop records with ``iteration >= start_iteration`` (and torn lines); returns how many lines
    were dropped. The file is rewritten atomically (temp file + rename)."""
    path = _resolve_metrics_path(path)
    if not path.exists():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [json.dumps(r) for r in read_metrics(path) if r["iteration"] < start_iteration]
    dropped = len(lines) - len(kept)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, path)
    return dropped


# ----------------------------------------------------------------------------------------------------
# The logger.


def _is_primary() -> bool:
    try:
        import jax
        return jax.process_index() == 0
    except Exception:  # noqa: BLE001 -- no backend: a single process
        return True


class MetricsLogger:
    """Writes each iteration's metrics to metrics.jsonl, TensorBoard and a progress bar.

        logger = MetricsLogger(workdir, start_iteration=meta.iteration if restored else 0,
                               total_iterations=config.num_iterations)
        for it in range(start, n):
            ...
            logger.log(it, metrics)   # raises MetricsError on NaN/inf before writing anything
        logger.close()

    `start_iteration` is the number of iterations already done (the restored checkpoint's step;
    0 for a fresh run): lines of later iterations are dropped from an existing metrics.jsonl. Only
    the primary process writes (`enabled` defaults to `jax.process_index() == 0`); the NaN check
    runs on every process.
    """

    def __init__(self, workdir: str | os.PathLike, *, start_iteration: int = 0,
                 total_iterations: int | None = None, tensorboard: bool = True, progress: bool = True,
                 postfix: Sequence[tuple[str, str]] = DEFAULT_POSTFIX, enabled: bool | None = None):
        self.workdir = Path(workdir).expanduser()
        self.path = self.workdir / METRICS_FILE
        self.start_iteration = int(start_iteration)
        self.postfix = tuple(postfix)
        self.enabled = _is_primary() if enabled is None else bool(enabled)
        self._file = self._writer = self._bar = None
        self.dropped = 0
        if not self.enabled:
            return
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.dropped = truncate_metrics(self.path, self.start_iteration)
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise MetricsError(f"workdir {str(self.workdir)!r} is not writable ({e.strerror or e}); accepted: a "
                               "directory this process can create and write to") from None
        if tensorboard:
            from tensorboardX import SummaryWriter
            # purge_step: TensorBoard hides events of steps >= start_iteration written before.
            self._writer = SummaryWriter(logdir=str(self.workdir / TENSORBOARD_DIR),
                                         purge_step=self.start_iteration, flush_secs=10)
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_iterations, initial=self.start_iteration, unit="it",
                             dynamic_ncols=True, mininterval=0.5, file=sys.stderr, desc="train")

    def log(self, iteration: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Check, write and show the metrics of iteration `iteration` (0-based); returns them as floats."""
        iteration = int(iteration)
        values = as_float_metrics({k: v for k, v in metrics.items() if k != "iteration"}, iteration)
        if not self.enabled:
            return values
        record = {"iteration": iteration, **values}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, global_step=iteration)
        if self._bar is not None:
            self._bar.update(iteration + 1 - self._bar.n)
            shown = {label: f"{values[key]:.4g}" for label, key in self.postfix if key in values}
            if shown:
                self._bar.set_postfix(shown, refresh=False)
        return values

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------
# Plots.


def _runs_mapping(runs: str | os.PathLike | Sequence | Mapping) -> dict[str, Path]:
    if isinstance(runs, Mapping):
        return {str(k): Path(v) for k, v in runs.items()}
    if isinstance(runs, (str, os.PathLike)):
        runs = [runs]
    out: dict[str, Path] = {}
    for r in runs:
        p = Path(r)
        label = p.name if p.is_dir() else (p.parent.name or p.stem)
        while label in out:
            label += "'"
        out[label] = p
    return out


def _ema(y: Sequence[float], weight: float) -> list[float]:
    out, acc = [], None
    for v in y:
        acc = v if acc is None else weight * acc + (1 - weight) * v
        out.append(acc)
    return out


def plot_curves(runs: str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
                out_png: str | os.PathLike, *, keys: Sequence[tuple[str, str]] = DEFAULT_PLOT_KEYS,
                smooth: float = 0.0, title: str | None = None) -> Path:
    """Plot reward, KL and objective per iteration for one run or several (a label -> path mapping,
    or a list of paths labelled by their folder); paths are metrics.jsonl files or run workdirs.
    `smooth` in [0, 1) draws an exponential moving average over the faint raw curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth={smooth!r}; accepted: a number in [0, 1)")
    data = {label: read_metrics(path) for label, path in _runs_mapping(runs).items()}
    if not data:
        raise MetricsError("no runs given to plot_curves; accepted: a metrics.jsonl path, a workdir, or a "
                           "label -> path mapping")
    fig = Figure(figsize=(5 * len(keys), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    plotted = 0
    for ax, (panel, key) in zip(axes, keys):
        for i, (label, records) in enumerate(data.items()):
            pts = [(r["iteration"], r[key]) for r in records if key in r]
            if not pts:
                continue
            x, y = zip(*pts)
            color = f"C{i}"
            if smooth:
                ax.plot(x, y, color=color, alpha=0.25, linewidth=1)
                ax.plot(x, _ema(y, smooth), color=color, label=label, linewidth=1.6)
            else:
                ax.plot(x, y, color=color, label=label, linewidth=1.4, marker="." if len(x) < 30 else None)
            plotted += 1
        ax.set_title(panel)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        if len(data) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not plotted:
        wanted = ", ".join(k for _, k in keys)
        where = ", ".join(str(p) for p in _runs_mapping(runs).values())
        raise MetricsError(f"none of the metrics {wanted} is in {where}; "
                           "accepted: metrics files written by MetricsLogger")
    if title:
        fig.suptitle(title)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m klq_jax.logs",
                                     description="Plot reward, KL and objective curves of one or more runs.")
    parser.add_argument("runs", nargs="+", help="RUN or LABEL=RUN, where RUN is a workdir or a metrics.jsonl")
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) (0 = raw)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(None if argv is None else list(argv))
    runs: dict[str, str] = {}
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).name if Path(spec).is_dir() else Path(spec).parent.name, spec
        runs[label or path] = path
    try:
        out = plot_curves(runs, args.out, smooth=args.smooth, title=args.title)
    except (MetricsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
