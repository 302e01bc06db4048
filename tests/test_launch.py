"""launch/: the Cloud TPU and GPU-node scripts. Their dry runs print every command (one per line, "+ "
and shell words); the tests parse those lines back with shlex and check what would run, with a `gcloud`
on PATH that fails if anything calls it. shellcheck must pass on both scripts."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu.sh"
GPU = REPO / "launch" / "gpu_node.sh"


@pytest.fixture
def no_gcloud(tmp_path):
    """PATH with a `gcloud` (and `gsutil`) that records the call and fails: dry runs must not call them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "gsutil"):
        stub = bin_dir / tool
        stub.write_text(f"#!/bin/sh\necho called >> {tmp_path}/called\nexit 99\n")
        stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    yield env
    assert not (tmp_path / "called").exists(), "a dry run called gcloud"


def dry_run(script: Path, *args: str, env=None) -> tuple[list[list[str]], subprocess.CompletedProcess]:
    proc = subprocess.run(["bash", str(script), "--dry-run", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
    return commands, proc


def flag(cmd: list[str], name: str) -> str | None:
    for word in cmd:
        if word.startswith(f"--{name}="):
            return word.split("=", 1)[1]
    return None


def remote(cmd: list[str]) -> str:
    """The command line a `gcloud ... ssh --command=...` runs on the workers."""
    value = flag(cmd, "command")
    assert value is not None, cmd
    return value


@pytest.mark.parametrize("accelerator, version, zone, hosts", [
    ("v4-8", "tpu-ubuntu2204-base", "us-central2-b", 1),
    ("v4-32", "tpu-ubuntu2204-base", "us-central2-b", 4),
    ("v5litepod-8", "v2-alpha-tpuv5-lite", "us-west4-a", 1),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", "us-west4-a", 4),
    ("v5p-8", "v2-alpha-tpuv5", "us-east5-a", 1),
    ("v5p-64", "v2-alpha-tpuv5", "us-east5-a", 8),
    ("v6e-8", "v2-alpha-tpuv6e", "us-east1-d", 1),
])
def test_tpu_all_dry_run(no_gcloud, accelerator, version, zone, hosts):
    workdir = "gs://bucket/run" if hosts > 1 else "runs/x"
    commands, proc = dry_run(TPU, "all", "--accelerator", accelerator, "--config", "configs/scale.py:tiny_mesh",
                             "--workdir", workdir, "--", "--config.num_iterations=3", "--config.seed=it's 1",
                             env=no_gcloud)
    assert f"{hosts} host(s)" in proc.stdout
    gcloud = [c for c in commands if c[0] == "gcloud"]
    create, delete = gcloud[0], gcloud[-1]
    name = f"klq-{accelerator}"
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and create[5] == name
    assert flag(create, "accelerator-type") == accelerator and flag(create, "version") == version
    assert flag(create, "zone") == zone
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", name] and "--quiet" in delete

    ssh = [c for c in gcloud if c[4] == "ssh"]
    setup, start, logs = ssh
    setup_words = shlex.split(remote(setup).replace("&&", " ; "))
    assert flag(setup, "worker") == "all" and "jax[tpu]" in setup_words and "python3.11" in setup_words
    assert any(c[4] == "scp" and flag(c, "worker") == "all" for c in gcloud)  # the code reaches every worker
    assert flag(start, "worker") == "all"
    words = shlex.split(remote(start))
    main = words[words.index("-m"):]
    assert main[:2] == ["-m", "klq_jax.main"] and "--config=configs/scale.py:tiny_mesh" in main
    assert f"--workdir={workdir}" in main and "--config.num_iterations=3" in main
    assert "--config.seed=it's 1" in main  # extra flags survive two rounds of quoting
    assert ("--distributed" in main) == (hosts > 1)
    assert flag(logs, "worker") == "0" and "tail" in remote(logs)
    fetch = [c for c in commands if c[:3] == ["gcloud", "storage", "cp"] or (c[0] == "gcloud" and "--recurse" in c)]
    assert fetch, commands


def test_tpu_single_commands_and_queued(no_gcloud):
    commands, _ = dry_run(TPU, "create", "--accelerator", "v6e-16", "--queued", "--spot", "--name", "my-run",
                          "--project", "proj", "--zone", "europe-west4-a", env=no_gcloud)
    create = commands[0]
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"] and "--spot" in create
    assert flag(create, "node-id") == "my-run" and flag(create, "project") == "proj"
    assert flag(create, "zone") == "europe-west4-a" and flag(create, "runtime-version") == "v2-alpha-tpuv6e"
    commands, _ = dry_run(TPU, "delete", "--accelerator", "v6e-16", "--queued", "--name", "my-run", env=no_gcloud)
    assert commands[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"] and "--force" in commands[0]
    commands, _ = dry_run(TPU, "fetch", "--workdir", "runs/a", "--results", "out/a", env=no_gcloud)
    scp = [c for c in commands if c[0] == "gcloud"][0]
    assert "--recurse" in scp and "klq-v4-8:~/klq_jax/runs/a" in scp and "out/a/" in scp
    commands, _ = dry_run(TPU, "logs", "--worker", "3", env=no_gcloud)
    assert flag(commands[0], "worker") == "3"


def test_pod_slice_without_shared_workdir_warns(no_gcloud):
    _, proc = dry_run(TPU, "run", "--accelerator", "v4-32", env=no_gcloud)
    assert "warning" in proc.stderr and "gs://" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["all", "--accelerator", "v3-8"], "--accelerator=v3-8"),
    (["--accelerator", "v4-8"], "no command"),
    (["create", "delete"], "two commands"),
    (["create", "--name", "Bad_Name"], "--name=Bad_Name"),
    (["create", "--frobnicate"], "unknown argument '--frobnicate'"),
    (["logs", "--worker", "x"], "--worker=x"),
])
def test_tpu_bad_input_is_one_line(no_gcloud, args, message):
    proc = subprocess.run(["bash", str(TPU), "--dry-run", *args], capture_output=True, text=True, env=no_gcloud,
                          cwd=REPO)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_gpu_node_dry_run(no_gcloud):
    commands, _ = dry_run(GPU, "--setup", "--gpus", "0,1,2,3", "--venv", "/opt/venv", "--",
                          "--config.mesh.fsdp=4", "--config.seed=a b", env=no_gcloud)
    assert commands[0][:2] == ["python3", "-c"] and "(3, 11)" in commands[0][2]
    assert commands[1] == ["python3", "-m", "venv", "/opt/venv"]
    assert any("jax[cuda12]" in c for c in commands)
    check = [c for c in commands if "-c" in c and c[0] == "env"][0]
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in check and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in check
    train = commands[-1]
    assert train[:2] == ["bash", "-c"]
    inner = shlex.split(train[2].split("; ", 1)[1].split(" 2>&1 | tee")[0])
    assert inner[:3] == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "CUDA_VISIBLE_DEVICES=0,1,2,3"]
    assert inner[3:6] == ["/opt/venv/bin/python", "-m", "klq_jax.main"]
    assert "--config=configs/scale.py:pythia1b_tldr_gpu8" in inner and "--config.seed=a b" in inner
    assert "--workdir=runs/gpu-pythia1b_tldr_gpu8" in inner and "--distributed" not in inner
    assert "tee -a runs/gpu-pythia1b_tldr_gpu8/train.log" in train[2]


@pytest.mark.parametrize("args, message", [(["--gpus", "0;rm"], "--gpus=0;rm"),
                                           (["--mem-fraction", "2"], "--mem-fraction=2"),
                                           (["--nope"], "unknown argument '--nope'")])
def test_gpu_node_bad_input(args, message):
    proc = subprocess.run(["bash", str(GPU), "--dry-run", *args], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and message in proc.stderr


def test_help():
    for script in (TPU, GPU):
        proc = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0 and "--dry-run" in proc.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck_passes():
    proc = subprocess.run(["shellcheck", "--severity=style", str(TPU), str(GPU)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
