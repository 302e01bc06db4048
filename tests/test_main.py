"""`python -m klq_jax.main` end to end on a tiny model: a run, its outputs and export, SIGKILL-and-resume
equal to an uninterrupted run, and one clear line with a non-zero exit for each bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from klq_jax.checkpoints import kill_and_resume, load_raw  # noqa: E402
from klq_jax.models.gguf import embedded_smollm2_path  # noqa: E402
from klq_jax.models.hf import read_safetensors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REWARD = str(ROOT / "tests" / "fixtures" / "rewards.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _tiny_llama(path: Path, vocab_size: int = 49152) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer and chat template (a real HF folder)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(embedded_smollm2_path() / name, path / name)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def _cmd(workdir, model, *overrides, config="configs/dialogue.py:tiny"):
    return [sys.executable, "-m", "klq_jax.main", f"--config={config}", f"--workdir={workdir}",
            f"--config.model.policy={model}", "--config.reward.kind=callable",
            f"--config.reward.path={REWARD}:distinct_words", *overrides]


def _run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("algo", ["klq", "ppo"])
def test_run_writes_metrics_checkpoints_plot_and_export(tiny_model, tmp_path, algo):
    workdir = tmp_path / "run"
    result = _run(_cmd(workdir, tiny_model, f"--config.algo={algo}"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1]
    for key in ("rollout/reward", "rollout/kl", "rollout/objective", "rollout/entropy", "rollout/response_length",
                "rollout/eos_rate", "train/value_error", "perf/tokens_per_s", "time/sample", "time/update"):
        assert key in records[0], key
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert (workdir / "curves.png").stat().st_size > 10_000
    evals = json.loads((workdir / "eval.json").read_text())
    assert evals["initial"]["eval/num_prompts"] == evals["final"]["eval/num_prompts"] == 4
    assert any((workdir / "tensorboard").iterdir())
    # The exported policy loads in transformers and carries the trained (not the initial) weights.
    exported = transformers.AutoModelForCausalLM.from_pretrained(workdir / "policy_hf")
    trained = load_raw(workdir)[0]["params"]["embed_vd"]["value"]
    np.testing.assert_array_equal(exported.model.embed_tokens.weight.detach().numpy(), np.asarray(trained))
    initial = read_safetensors(tiny_model / "model.safetensors")["model.embed_tokens.weight"]
    assert np.abs(np.asarray(trained) - initial).max() > 0
    transformers.AutoTokenizer.from_pretrained(workdir / "policy_hf")


def test_sigkill_and_resume_equals_uninterrupted(tiny_model, tmp_path):
    overrides = ("--config.num_iterations=6", "--config.checkpoint.every=2", "--config.rl.num_minibatches=2",
                 "--config.batch_size=4")
    straight = _run(_cmd(tmp_path / "straight", tiny_model, *overrides))
    assert straight.returncode == 0, straight.stderr[-3000:]
    # Killed right after the save of checkpoint 4 starts (it may or may not have committed), then rerun.
    first, second = kill_and_resume(_cmd(tmp_path / "killed", tiny_model, *overrides),
                                    r"saving checkpoint 4", cwd=ROOT, timeout=300)
    assert first.killed and second.returncode == 0
    assert "resumed from checkpoint" in second.output
    a, _ = load_raw(tmp_path / "straight")
    b, _ = load_raw(tmp_path / "killed")
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 10
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2, 3, 4, 5]


def test_rerun_of_a_finished_run_resumes_and_does_nothing(tiny_model, tmp_path):
    cmd = _cmd(tmp_path / "run", tiny_model)
    assert _run(cmd).returncode == 0
    again = _run(cmd)
    assert again.returncode == 0 and "resumed from checkpoint 2" in again.stdout
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


# ------------------------------------------------------------------------------------------------
def test_run_with_bf16_matmuls(tiny_model, tmp_path):
    """`model.matmul_dtype=bfloat16` trains end to end: fp32 parameters and optimiser state, finite metrics, and
    a KL near 0 in the first rollout, where the policy is the reference (both use bf16 matmuls)."""
    workdir = tmp_path / "run"
    result = _run(_cmd(workdir, tiny_model, "--config.model.matmul_dtype=bfloat16", "--config.eval.num_prompts=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1]
    assert all(np.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    assert abs(records[0]["rollout/kl"]) < 0.05, records[0]["rollout/kl"]
    assert json.loads((workdir / "config.json").read_text())["model"]["matmul_dtype"] == "bfloat16"
    assert load_raw(workdir)[0]["params"]["embed_vd"]["value"].dtype == np.float32


def test_reference_beside_the_reward_changes_no_number(tiny_model, tmp_path):
    """`reward.overlap_reference` "on" (the reference forward on a second thread while the reward scores; "auto"
    picks it on one CPU device) against "off": the same metrics (but the times) and the same trained weights."""
    runs = {}
    for choice in ("off", "on"):
        workdir = tmp_path / choice
        result = _run(_cmd(workdir, tiny_model, f"--config.reward.overlap_reference={choice}",
                           "--config.eval.num_prompts=0", "--config.batch_size=4"))
        assert result.returncode == 0, result.stderr[-3000:]
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        assert all(0 < r["time/scoring"] < r["time/iteration"] for r in records)
        runs[choice] = ([{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in records],
                        jax.tree.leaves(load_raw(workdir)[0]["params"]))
    assert runs["on"][0] == runs["off"][0] and len(runs["on"][0]) == 2
    for x, y in zip(runs["on"][1], runs["off"][1], strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Bad input: one line on stderr naming the value, exit status 2, nothing saved corrupted.


def _bad(cmd, *needles):
    result = _run(cmd, timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-2000:]
    for needle in needles:
        assert needle in last, last
    return last


def test_unknown_config_key(tiny_model, tmp_path):
    _bad(_cmd(tmp_path / "w", tiny_model, "--config.no_such_key=3"), "no_such_key")


def test_bad_algo(tiny_model, tmp_path):
    _bad(_cmd(tmp_path / "w", tiny_model, "--config.algo=dpo"), "dpo", "klq", "ppo")


def test_bad_matmul_dtype(tiny_model, tmp_path):
    _bad(_cmd(tmp_path / "w", tiny_model, "--config.model.matmul_dtype=float16"), "model.matmul_dtype", "float16",
         "bfloat16")


def test_bad_matmul_precision(tiny_model, tmp_path):
    _bad(_cmd(tmp_path / "w", tiny_model, "--config.model.matmul_precision=tf32"), "model.matmul_precision", "tf32",
         "highest")


def test_bad_overlap_reference(tiny_model, tmp_path):
    _bad(_cmd(tmp_path / "w", tiny_model, "--config.reward.overlap_reference=yes"), "reward.overlap_reference",
         "'yes'", "'auto'", "'off'")


def test_bad_replay_gate_up(tiny_model, tmp_path):
    _bad(_cmd(tmp_path / "w", tiny_model, "--config.rl.replay_gate_up=always"), "rl.replay_gate_up", "'always'",
         "'auto'", "'on'", "'off'")


def test_bad_replay_attention(tiny_model, tmp_path):
    _bad(_cmd(tmp_path / "w", tiny_model, "--config.rl.replay_attention=auto"), "rl.replay_attention", "'auto'",
         "'off'", "'on'")


def test_bad_replay_probs(tiny_model, tmp_path):
    _bad(_cmd(tmp_path / "w", tiny_model, "--config.rl.replay_probs=bf16"), "rl.replay_probs", "'bf16'", "'off'",
         "'on'")


def _dialogue_config_and_meshes():
    """The embedded default's config, a one-device mesh and an abstract 8-device one."""
    from klq_jax.memory import load_config

    config, _ = load_config(str(ROOT / "configs" / "dialogue.py"))
    return config, jax.make_mesh((1,), ("data",)), jax.sharding.AbstractMesh((8,), ("data",))


def test_overlap_reference_auto_is_on_for_one_cpu_device_only():
    from klq_jax import trainer

    config, one, several = _dialogue_config_and_meshes()
    assert config.reward.overlap_reference == "auto"
    assert trainer.overlap_reference(config, one)  # the tests run on the CPU
    assert not trainer.overlap_reference(config, several)
    config.reward.overlap_reference = "off"
    assert not trainer.overlap_reference(config, one)
    config.reward.overlap_reference = "on"
    assert trainer.overlap_reference(config, several)
    config.reward.overlap_reference = "sometimes"
    with pytest.raises(trainer.ConfigError, match="reward.overlap_reference='sometimes'; accepted: 'auto', 'on'"):
        trainer.overlap_reference(config, one)


def test_bad_replay_sampler_forward(tiny_model, tmp_path):
    _bad(_cmd(tmp_path / "w", tiny_model, "--config.rl.replay_sampler_forward=yes"), "rl.replay_sampler_forward",
         "'yes'", "'auto'", "'off'")


def test_replay_sampler_forward_auto_is_on_for_one_step_per_rollout_only():
    from klq_jax import trainer

    config, one, several = _dialogue_config_and_meshes()
    assert config.rl.replay_sampler_forward == "auto"
    assert config.rl.epochs * config.rl.num_minibatches > 1 and not trainer.replay_sampler_forward(config, one)
    config.rl.epochs = config.rl.num_minibatches = 1
    assert trainer.replay_sampler_forward(config, one)
    assert not trainer.replay_sampler_forward(config, several)
    config.model.remat = "dots"
    assert not trainer.replay_sampler_forward(config, one)
    config.rl.replay_sampler_forward = "on"
    with pytest.raises(trainer.ConfigError, match="needs model.remat='full'"):
        trainer.replay_sampler_forward(config, one)
    config.model.remat = "full"
    assert trainer.replay_sampler_forward(config, several)
    config.rl.epochs = 2
    with pytest.raises(trainer.ConfigError,
                       match=r"one update step per rollout \(rl.epochs \* rl.num_minibatches = 2\)"):
        trainer.replay_sampler_forward(config, one)
    config.rl.replay_sampler_forward = "off"
    config.rl.epochs = 1
    assert not trainer.replay_sampler_forward(config, one)


def test_replay_probs_is_off_by_default_and_on_one_device_only():
    """`rl.replay_probs` (the sampler's onehot - softmax, [V, N, B]: not split over a mesh's batch axis)."""
    from klq_jax import trainer

    config, one, several = _dialogue_config_and_meshes()
    assert config.rl.replay_probs == "off" and trainer.replay_probs_choice(config, one) == "off"
    config.rl.replay_probs = "on"
    assert trainer.replay_probs_choice(config, one) == "on" and trainer.replay_probs_choice(config) == "on"
    assert trainer.replay_probs_choice(config, several) == "off"


def test_matmul_precision_reaches_the_compiled_dots():
    """`model.matmul_precision` sets JAX's default for the fp32 dots traced after it; "default" leaves it alone
    (here the suite's "highest", from conftest.py)."""
    import jax.numpy as jnp
    import ml_collections

    from klq_jax import trainer

    def dot_precision():
        x = jnp.ones((4, 4), jnp.float32)
        text = jax.jit(jnp.dot).lower(x, x).as_text()
        return next(line for line in text.splitlines() if "dot_general" in line).split("precision = [")[1].split("]")[0]

    config = ml_collections.ConfigDict({"model": {"matmul_precision": "default"}})
    before = jax.config.jax_default_matmul_precision
    try:
        trainer.apply_matmul_precision(config)
        assert jax.config.jax_default_matmul_precision == before == "highest"
        assert dot_precision() == "HIGHEST, HIGHEST"
        config.model.matmul_precision = "high"
        trainer.apply_matmul_precision(config)
        assert dot_precision() == "HIGH, HIGH"
        config.model.matmul_precision = "float16"
        with pytest.raises(trainer.ConfigError, match="model.matmul_precision='float16'; accepted: 'default'"):
            trainer.apply_matmul_precision(config)
    finally:
        jax.config.update("jax_default_matmul_precision", before)


def test_a_second_run_loads_its_programs_from_the_compilation_cache(tiny_model, tmp_path):
    """`compile_cache`: the first run writes its compiled programs into one folder for this kind of machine; the
    same command again (a fresh run folder) reads them back, as JAX's log of cache hits shows, and its metrics
    equal the first run's. Entries whose write was cut short (a kill: truncated, no access-time file) are
    dropped and written again, not read as broken at every later run."""
    cache = tmp_path / "xla"
    env = {**os.environ, "JAX_DEBUG_LOG_MODULES": "jax._src.compiler",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # the tiny model's programs compile in under 1 s
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    runs = []
    for name in ("first", "second"):
        if runs:  # the rollout programs' writes as a kill would leave them
            cut = sorted(folder.glob("jit__generate-*-cache"))
            assert cut
            for entry in cut:
                entry.write_bytes(entry.read_bytes()[:100])
                Path(str(entry)[: -len("-cache")] + "-atime").unlink()
        result = subprocess.run(_cmd(tmp_path / name, tiny_model, f"--config.compile_cache={cache}"), cwd=ROOT,
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(result)
        (folder,) = cache.iterdir()
    assert folder.name.startswith("cpu-") and any(folder.glob("jit_update-*"))
    hit = "Persistent compilation cache hit for 'jit_update'"
    assert hit not in runs[0].stderr and hit in runs[1].stderr
    assert "Error reading persistent compilation cache" not in runs[1].stderr
    assert "PERSISTENT COMPILATION CACHE MISS for 'jit__generate'" in runs[1].stderr
    for entry in cut:  # written again, whole
        assert entry.stat().st_size > 100 and Path(str(entry)[: -len("-cache")] + "-atime").exists()
    records = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("first", "second")]
    for a, b in zip(*records, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith(("time/", "perf/"))} == \
            {k: v for k, v in b.items() if not k.startswith(("time/", "perf/"))}


def test_compile_cache_folder_per_machine_kind(tmp_path):
    from klq_jax import compile_cache

    two_cores = ("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n\n"
                 "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n")
    kind = compile_cache.machine_kind("cpu", "cpu", two_cores)
    assert kind.startswith("cpu-") and kind == compile_cache.machine_kind("cpu", "cpu", two_cores.split("\n\n")[0])
    assert kind != compile_cache.machine_kind("cpu", "cpu", two_cores.replace("avx2", "avx2 avx512f"))
    assert kind != compile_cache.machine_kind("cpu", "cpu", two_cores.replace("AMD EPYC", "Intel Xeon"))
    assert compile_cache.machine_kind("gpu", "NVIDIA H200", "") == "gpu-nvidia-h200"
    assert compile_cache.machine_kind("tpu", "TPU v5 lite", "") == "tpu-tpu-v5-lite"
    if jax.config.jax_compilation_cache_dir is None:  # (JAX_COMPILATION_CACHE_DIR, set by a user, takes precedence)
        assert compile_cache.enable("") is None and jax.config.jax_compilation_cache_dir is None


def test_compile_cache_that_cannot_be_made(tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    _bad(_cmd(tmp_path / "w", tiny_model, f"--config.compile_cache={blocker}"), "compile_cache", str(blocker),
         "writable folder")


def test_missing_checkpoint(tmp_path):
    _bad(_cmd(tmp_path / "w", tmp_path / "nowhere" / "model"), "nowhere")


def test_malformed_checkpoint(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "config.json").write_text("{not json")
    _bad(_cmd(tmp_path / "w", broken), "config.json", "malformed")


def test_tokenizer_that_does_not_fit_the_model(tmp_path):
    small = _tiny_llama(tmp_path / "small", vocab_size=1000)
    _bad(_cmd(tmp_path / "w", small), "49152", "1000")


def test_dataset_without_needed_fields(tiny_model, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n{"text": "there"}\n')
    _bad(_cmd(tmp_path / "w", tiny_model, f"--config.data.source={data}"), "prompt", "text")


def test_empty_prompt_set(tiny_model, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    _bad(_cmd(tmp_path / "w", tiny_model, f"--config.data.source={data}"), "empty")


def test_prompts_longer_than_the_limit(tiny_model, tmp_path):
    _bad(_cmd(tmp_path / "w", tiny_model, "--config.data.max_prompt_tokens=8"), "max_prompt_tokens=8")


def test_prompt_plus_response_longer_than_context(tiny_model, tmp_path):
    _bad(_cmd(tmp_path / "w", tiny_model, "--config.sampling.max_new_tokens=600"), "context 512")


def test_reward_returning_nan(tiny_model, tmp_path):
    cmd = _cmd(tmp_path / "w", tiny_model)
    cmd[-1] = f"--config.reward.path={REWARD}:nan_reward"
    _bad(cmd, "nan")


def test_workdir_not_writable(tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    _bad(_cmd(blocker / "run", tiny_model), str(blocker))


def test_checkpoints_from_another_config_are_not_touched(tiny_model, tmp_path):
    workdir = tmp_path / "run"
    assert _run(_cmd(workdir, tiny_model)).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in (workdir / "checkpoints").rglob("*") if p.is_file()}
    _bad(_cmd(workdir, tiny_model, "--config.rl.kl_coef=0.3"), "kl_coef")
    after = {p: p.stat().st_mtime_ns for p in (workdir / "checkpoints").rglob("*") if p.is_file()}
    assert before == after
