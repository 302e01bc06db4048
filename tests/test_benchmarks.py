"""The iteration benchmark's bookkeeping of several rounds (`benchmarks/iteration.py --rounds`), and the decode
split benchmark built against the kernel's source (`benchmarks/decode_split.py`)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from klq_jax.models import cpu_decode

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _iteration_module():
    saved = list(sys.path)  # iteration.py imports procstat from its folder and adds the repo and configs/ itself
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("iteration_bench", BENCHMARKS / "iteration.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved  # nothing of the import is left on this worker's path
    return module


def _round(first: float, *steady: float, rss: float, mm: float) -> dict:
    its = [{"iteration": t, "reward": 1.0, "reference": 1.0} for t in (first, *steady)]
    return {"iterations": its, "rss_peak_gib": rss, "matmul_gflops_jax": {"fp32": mm}}


def test_fastest_round_keeps_the_round_of_the_fastest_steady_iteration_and_the_highest_peak():
    bench = _iteration_module()
    # round 2's first iteration (compilation) is the fastest of all but does not count; its steady ones are slower
    rounds = [_round(70.0, 46.7, 47.0, rss=3.28, mm=49.0), _round(30.0, 48.0, 49.0, rss=3.31, mm=60.0),
              _round(65.0, 41.2, 44.0, rss=3.27, mm=70.0)]
    kept = bench.fastest_round(rounds)
    assert bench.best(kept)["iteration"] == 41.2
    assert kept["matmul_gflops_jax"] == {"fp32": 70.0}  # that round's own matmul reading, not another round's
    assert kept["rss_peak_gib"] == 3.31 and kept["rounds"] == 3
    assert rounds[2]["rss_peak_gib"] == 3.27  # the rounds themselves are left as they were
    one = bench.fastest_round(rounds[:1])
    assert bench.best(one)["iteration"] == 46.7 and one["rss_peak_gib"] == 3.28 and one["rounds"] == 1


@pytest.mark.skipif(not cpu_decode.isa_runs_here("avx2") or cpu_decode.machine_unsupported(None) is not None,
                    reason="needs the kernel's AVX2 build (x86-64 with AVX2 and FMA, a C++ compiler)")
def test_decode_split_builds_against_the_kernel_and_reports_each_split():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "decode_split.py"), "--rounds", "1"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert set(fields) == {"one_run_over_runs16", "one_run_next_over_runs16", "flat_over_runs16", "runs16_ms"}
    assert all(float(v) > 0 for v in fields.values())


def test_decode_split_refuses_a_bad_round_count():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "decode_split.py"), "--rounds", "0"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == "--rounds=0: expected a positive number of rounds"


@pytest.mark.skipif(not cpu_decode.isa_runs_here("avx2") or cpu_decode.machine_unsupported(None) is not None,
                    reason="the replays' records need the native decode step (here its AVX2 build)")
def test_replay_quality_reports_each_replay_against_the_exact_gradient(tmp_path):
    """`benchmarks/replay_quality.py` on a tiny Llama: every replay moves the gradient a little (bf16 roundings),
    none by more than a bf16 step of its norm; a bad size is refused in one line."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    script = str(BENCHMARKS / "replay_quality.py")
    done = subprocess.run([sys.executable, script, "--policy", str(tmp_path), "--batch", "2", "--new_tokens", "6"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    fields = dict(kv.split("=") for kv in done.stdout.strip().splitlines()[-1].split()[1:])
    assert set(fields) == {"gate_up_rel_l2", "attention_rel_l2", "probs_rel_l2", "probs_alone_rel_l2",
                           "probs_worst_array_rel_l2", "inputs_alone_rel_l2"}
    assert all(0 < float(v) < 2 ** -8 for v in fields.values()), fields
    bad = subprocess.run([sys.executable, script, "--batch", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == "--batch=0, --new_tokens=128: expected positive numbers"
