"""HF sequence-classification reward models through `HFRewardModel`, against transformers' own
scores of the same texts; and the configs' hub variants build."""

import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from klq_jax.models.gguf import embedded_smollm2_path  # noqa: E402
from klq_jax.reward_models import HFRewardModel  # noqa: E402
from klq_jax.rewards import RewardError  # noqa: E402


@pytest.fixture(scope="module")
def reward_model_folder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=2)
    path = tmp_path_factory.mktemp("rm")
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_smollm2_path() / name, path / name)
    return path


PROMPTS = ["What is the boiling point of water?", "Name a prime number.", "Say hello."]
RESPONSES = ["It boils at 100 degrees Celsius at sea level.", "Seven.", ""]


@pytest.mark.parametrize("chat", [False, True])
def test_scores_match_transformers(reward_model_folder, chat):
    rm = HFRewardModel(str(reward_model_folder), chat=chat, batch_size=2)  # 2: a partial last batch
    ours = rm(PROMPTS, RESPONSES)
    tokenizer = transformers.AutoTokenizer.from_pretrained(reward_model_folder)
    ref_model = transformers.AutoModelForSequenceClassification.from_pretrained(reward_model_folder).eval()
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                                tokenize=True, return_dict=False)
        else:
            ids = tokenizer(p + r)["input_ids"]
        with torch.no_grad():
            expected = ref_model(torch.tensor([ids])).logits[0, 0].item()
        assert abs(ours[i] - expected) <= 1e-4


def test_tokenizer_larger_than_model_is_rejected(reward_model_folder, tmp_path):
    small = tmp_path / "small"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=1)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(small)
    shutil.copy(reward_model_folder / "tokenizer.json", small / "tokenizer.json")
    shutil.copy(reward_model_folder / "tokenizer_config.json", small / "tokenizer_config.json")
    with pytest.raises(RewardError, match="49152 tokens, the model only 500"):
        HFRewardModel(str(small))


def _config_module(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / name
    module_spec = importlib.util.spec_from_file_location(name[:-3], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _dialogue_config():
    return _config_module("dialogue.py").get_config("")


@pytest.mark.parametrize("spec", ["dialogue.py:", "dialogue.py:hh", "dialogue.py:tiny", "summarisation.py:",
                                  "summarisation.py:tldr", "summarisation.py:tiny"])
def test_config_variants_build(spec):
    name, variant = spec.split(":")
    module = _config_module(name)
    config = module.get_config(variant)
    assert config.algo in ("klq", "ppo") and config.num_iterations > 0
    if variant in ("hh", "tldr"):
        assert config.reward.kind == "hf" and "/" in config.model.policy and "/" in config.data.source
        assert config.rl.missing_eos_penalty
    with pytest.raises(ValueError, match="unknown"):
        module.get_config("nope")


SHARDED_CHECK = """
import sys
import numpy as np
from klq_jax import sharding
from klq_jax.reward_models import HFRewardModel
folder = sys.argv[1]
prompts = {prompts!r}
responses = {responses!r}
plain = HFRewardModel(folder, chat=False)(prompts, responses)
rm = HFRewardModel(folder, chat=False, mesh=sharding.local_mesh({{"data": 1, "fsdp": 4, "tensor": 2}}))
assert any(len(x.sharding.device_set) > 1 for x in __import__("jax").tree.leaves(rm.state))
np.testing.assert_allclose(rm(prompts, responses), plain, atol=1e-5)
print("sharded reward model ok")
"""


def test_sharded_reward_model_matches_single_device(reward_model_folder):
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    code = SHARDED_CHECK.format(prompts=PROMPTS, responses=RESPONSES)
    result = subprocess.run([sys.executable, "-c", code, str(reward_model_folder)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "sharded reward model ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("setting, model_setting, fast_bf16, expected", [
    ("bfloat16", "", False, "bfloat16"), ("", "", True, None), ("", "bfloat16", False, "bfloat16"),
    ("float32", "bfloat16", True, "float32"), ("auto", "", True, "bfloat16"), ("auto", "", False, None),
    ("auto", "bfloat16", False, "bfloat16")])
def test_reward_matmul_dtype_from_config(reward_model_folder, monkeypatch, setting, model_setting, fast_bf16,
                                         expected):
    """`reward.matmul_dtype` reaches the HF reward model (empty: `model.matmul_dtype`'s choice; "auto": bf16 where
    bf16 matmuls are fast, else as empty); with bf16 weights (the default storage), bf16 operands round only the
    activations: scores move, by bf16's rounding."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from klq_jax import hardware, trainer

    monkeypatch.setattr(hardware, "this_bf16_matmul_is_fast", lambda: fast_bf16)
    config = _dialogue_config()
    assert config.reward.matmul_dtype == "auto"
    config.reward.kind, config.reward.path = "hf", str(reward_model_folder)
    config.reward.matmul_dtype, config.model.matmul_dtype = setting, model_setting
    rm = trainer.build_reward(config)
    got = nnx.merge(rm.graphdef, rm.state).matmul_dtype
    assert (got is None and expected is None) or jnp.dtype(got) == jnp.dtype(expected)
    if setting == "bfloat16":
        fp32_operands = HFRewardModel(str(reward_model_folder), batch_size=config.batch_size,
                                      param_dtype=jnp.bfloat16, dtype=jnp.float32)
        scores, reference = np.asarray(rm(PROMPTS, RESPONSES)), np.asarray(fp32_operands(PROMPTS, RESPONSES))
        assert not np.array_equal(scores, reference)
        np.testing.assert_allclose(scores, reference, atol=2.0**-8 * np.abs(reference).max())  # one bf16 ulp


def test_bad_reward_matmul_dtype(reward_model_folder):
    from klq_jax import trainer

    config = _dialogue_config()
    config.reward.kind, config.reward.path, config.reward.matmul_dtype = "hf", str(reward_model_folder), "float16"
    with pytest.raises(trainer.ConfigError, match="reward.matmul_dtype='float16'; accepted"):
        trainer.build_reward(config)


CPUINFO_ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
flags\t\t: fpu sse2 avx fma avx2 bmi2
"""
CPUINFO_ZEN5 = CPUINFO_ZEN3.replace("avx2 bmi2", "avx2 bmi2 avx512f avx512bw avx512_bf16 avx512_vnni")
CPUINFO_ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize("backend, cpuinfo, fast", [("cpu", CPUINFO_ZEN3, False), ("cpu", CPUINFO_ZEN5, True),
                                                    ("cpu", CPUINFO_ARM, False), ("cpu", "", False),
                                                    ("gpu", CPUINFO_ZEN3, True), ("tpu", "", True)])
def test_bf16_matmul_is_fast(backend, cpuinfo, fast):
    """bf16 where the matrix units take it (GPU, TPU, AVX-512 BF16), fp32 on other CPUs (AVX2 alone: bf16 dots
    at 0.69x fp32's speed on a Zen 3 VM; Arm's bf16 extension: not measured)."""
    from klq_jax import hardware

    flags = hardware.cpu_flags(cpuinfo)
    assert ("avx2" in flags) == ("avx2" in cpuinfo) and ("bf16" in flags) == (cpuinfo is CPUINFO_ARM)
    assert hardware.bf16_matmul_is_fast(backend, flags) is fast
