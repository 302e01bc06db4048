"""Run logs: metrics.jsonl content and truncation on resume, TensorBoard events, the NaN error,
and the PNG curves (one run and a KLQ-vs-PPO comparison)."""

import json
import math

import numpy as np
import pytest

from klq_jax.logs import MetricsError, MetricsLogger, main, plot_curves, read_metrics, truncate_metrics


def _metrics(it, algo_shift=0.0):
    return {"rollout/reward": 0.1 * it + algo_shift, "rollout/kl": np.float32(0.01 * it ** 1.5),
            "rollout/objective": 0.1 * it - 0.05 * 0.01 * it ** 1.5, "train/loss": np.array(1.0 / (it + 1)),
            "iteration": float(it)}


def _write_run(workdir, n, start=0, shift=0.0):
    with MetricsLogger(workdir, start_iteration=start, total_iterations=n, progress=False) as logger:
        for it in range(start, n):
            logger.log(it, _metrics(it, shift))


def test_jsonl_content_and_tensorboard(tmp_path):
    _write_run(tmp_path, 4)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    recs = [json.loads(ln) for ln in lines]
    assert [r["iteration"] for r in recs] == [0, 1, 2, 3]
    assert set(recs[0]) == {"iteration", "rollout/reward", "rollout/kl", "rollout/objective", "train/loss"}
    assert all(isinstance(v, float) for r in recs for k, v in r.items() if k != "iteration")
    assert recs[2]["rollout/kl"] == pytest.approx(0.01 * 2 ** 1.5, rel=1e-6)
    assert read_metrics(tmp_path) == recs
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_lines_are_flushed_as_written(tmp_path):
    logger = MetricsLogger(tmp_path, progress=False, tensorboard=False)
    logger.log(0, {"a": 1.0})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"iteration": 0, "a": 1.0}
    logger.close()


def test_resume_drops_lines_after_the_checkpoint(tmp_path):
    _write_run(tmp_path, 6)  # the interrupted run got to iteration 5 ...
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 6, "rollout/rew')  # ... and was killed mid-line
    # ... but its last checkpoint holds 3 completed iterations: iterations 3.. are run again.
    _write_run(tmp_path, 8, start=3, shift=100.0)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in recs] == list(range(8))
    assert [r["rollout/reward"] >= 100 for r in recs] == [False] * 3 + [True] * 5
    # A fresh run (no checkpoint) in the same workdir starts the file over.
    assert truncate_metrics(tmp_path, 0) == 8
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_nan_is_a_one_line_error_naming_metric_and_iteration(tmp_path):
    with MetricsLogger(tmp_path, progress=False, tensorboard=False) as logger:
        logger.log(0, {"rollout/kl": 0.1})
        with pytest.raises(MetricsError, match=r"rollout/kl=nan at iteration 7") as e:
            logger.log(7, {"rollout/reward": 1.0, "rollout/kl": float("nan")})
        assert "\n" not in str(e.value)
        with pytest.raises(MetricsError, match=r"train/loss=inf at iteration 8"):
            logger.log(8, {"train/loss": np.float32(np.inf)})
        with pytest.raises(MetricsError, match="'note' at iteration 9 is str"):
            logger.log(9, {"note": "hello"})
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0]  # nothing bad was written


def _png_is_nontrivial(path):
    import matplotlib.image

    assert path.stat().st_size > 10_000
    img = matplotlib.image.imread(str(path))
    assert img.shape[0] > 200 and img.shape[1] > 600
    assert np.std(img[..., :3]) > 0.05  # not a blank canvas
    return img


def test_plot_curves_single_and_comparison(tmp_path):
    _write_run(tmp_path / "klq", 12)
    _write_run(tmp_path / "ppo", 12, shift=-0.5)
    one = plot_curves(tmp_path / "klq" / "metrics.jsonl", tmp_path / "one.png")
    _png_is_nontrivial(one)
    two = plot_curves({"KLQ": tmp_path / "klq", "PPO": tmp_path / "ppo"}, tmp_path / "plots" / "cmp.png",
                      smooth=0.6, title="KLQ vs PPO")
    _png_is_nontrivial(two)
    assert main(["--out", str(tmp_path / "cli.png"), f"klq={tmp_path / 'klq'}", str(tmp_path / "ppo")]) == 0
    _png_is_nontrivial(tmp_path / "cli.png")
    with pytest.raises(MetricsError, match="does not exist"):
        plot_curves(tmp_path / "missing.jsonl", tmp_path / "x.png")
    assert math.isfinite(read_metrics(tmp_path / "klq")[-1]["rollout/objective"])
