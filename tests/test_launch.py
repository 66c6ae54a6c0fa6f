"""Tests for the launch/ scripts.

Every script is run with --dry-run and a PATH whose gcloud / sbatch / srun /
tar / git / ssh / scp are fakes that record the call and fail: a dry run must
print the exact commands and execute none of them. A second set of fakes only
records its argv; running the scripts for real against those checks that what
--dry-run prints is exactly what would be executed.
"""

import os
import shlex
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO, "launch", "slurm_gpu.sh")
SBATCH = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
SCRIPTS = [TPU, SLURM, SBATCH]

FAKED = ("gcloud", "sbatch", "srun", "tar", "git", "ssh", "scp", "gsutil")
# Variables the scripts read; cleared so the caller's environment cannot leak in.
SCRIPT_ENV = ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION",
              "REPO_URL", "BRANCH", "REMOTE_DIR", "CONFIG", "WORKDIR", "DATA_DIR",
              "PYTHON", "NODES", "GPUS_PER_NODE", "CPUS_PER_TASK", "TIME_LIMIT",
              "PARTITION", "ACCOUNT", "QOS", "JOB_NAME", "REPO_DIR",
              "DEBIFORMER_PYTHON", "SLURM_CPUS_PER_TASK", "SLURM_JOB_ID",
              "SLURM_NTASKS", "SLURM_JOB_NUM_NODES")

FORBIDDEN = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_CALLS"
echo "fake $(basename "$0") must not be called in a dry run" >&2
exit 97
"""
RECORDER = """#!/bin/bash
{ printf '%s\\0' "$(basename "$0")" "$@"; printf '\\n'; } >> "$FAKE_CALLS"
exit 0
"""


def _make_bin(directory, body):
  os.makedirs(directory, exist_ok=True)
  for name in FAKED:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
      f.write(body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return directory


class Runner:
  """Runs a launch script with fake tools first on PATH."""

  def __init__(self, tmp_path, body):
    os.makedirs(tmp_path, exist_ok=True)
    self.bin = _make_bin(str(tmp_path / "bin"), body)
    self.calls_file = str(tmp_path / "calls")

  def __call__(self, script, *args, env=None, via_bash=False):
    full_env = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
    full_env["PATH"] = self.bin + os.pathsep + full_env.get("PATH", "/usr/bin:/bin")
    full_env["FAKE_CALLS"] = self.calls_file
    full_env.update(env or {})
    argv = (["bash", script] if via_bash else [script]) + list(args)
    return subprocess.run(argv, env=full_env, cwd=REPO, capture_output=True,
                          text=True, timeout=30)

  def calls(self):
    if not os.path.exists(self.calls_file):
      return ""
    with open(self.calls_file) as f:
      return f.read()


@pytest.fixture
def dry(tmp_path):
  runner = Runner(tmp_path / "dry", FORBIDDEN)
  yield runner
  assert runner.calls() == "", "a dry run executed: " + runner.calls()


@pytest.fixture
def real(tmp_path):
  """Fakes that record argv (NUL-separated, one call per line) and succeed."""
  runner = Runner(tmp_path / "real", RECORDER)

  def recorded():
    data = runner.calls()
    calls = []
    for chunk in data.split("\0\n"):
      if chunk:
        calls.append(chunk.split("\0"))
    return calls

  runner.recorded = recorded
  return runner


def lines(result):
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


def assert_usage_error(result, *needles):
  assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
  assert result.stdout == ""
  assert "error" in result.stderr and "--help" in result.stderr
  for needle in needles:
    assert needle in result.stderr


# --------------------------------------------------------------------------- #
# Basic hygiene
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_strict_bash(script):
  with open(script) as f:
    text = f.read()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "set -euo pipefail" in text
  assert os.access(script, os.X_OK)
  subprocess.run(["bash", "-n", script], check=True, timeout=10)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(dry, script):
  result = dry(script, "--help", via_bash=script == SBATCH)
  assert result.returncode == 0, result.stderr
  assert "--dry-run" in result.stdout
  assert "Usage" in result.stdout or "SLURM" in result.stdout


# --------------------------------------------------------------------------- #
# tpu_pod.sh
# --------------------------------------------------------------------------- #

SSH = "gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b"
LOG = "$HOME/debiformer-logs/train-$(hostname).log"


def test_tpu_create(dry):
  out = lines(dry(TPU, "--dry-run", "create", "--name", "my-tpu", "--zone",
                  "us-central2-b", "--accelerator-type", "v4-32", "--spot"))
  assert out == [
      "gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b "
      "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"]


def test_tpu_create_from_env(dry):
  out = lines(dry(TPU, "create", "--dry-run", "--preemptible", env=dict(
      TPU_NAME="pod1", ZONE="us-east5-b", ACCELERATOR_TYPE="v6e-16",
      RUNTIME_VERSION="v2-alpha-tpuv6e", PROJECT="my-proj")))
  assert out == [
      "gcloud compute tpus tpu-vm create pod1 --zone=us-east5-b --project=my-proj "
      "--accelerator-type=v6e-16 --version=v2-alpha-tpuv6e --preemptible"]


def test_tpu_flags_override_env_and_inline_values(dry):
  out = lines(dry(TPU, "create", "--dry-run", "--name=n2", "--zone=z2",
                  "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
                  env=dict(TPU_NAME="n1", ZONE="z1", ACCELERATOR_TYPE="v4-8")))
  assert out == [
      "gcloud compute tpus tpu-vm create n2 --zone=z2 "
      "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite"]


def test_tpu_setup_copies_repo_to_all_workers(dry):
  out = lines(dry(TPU, "setup", "--dry-run", "--name", "my-tpu", "--zone",
                  "us-central2-b"))
  tarball = "/tmp/debiformer-jax-src.tar.gz"
  assert out == [
      f"tar -C {REPO} --exclude=./.git --exclude=__pycache__ --exclude=.pytest_cache "
      f"--exclude='./workdir*' --exclude=./runs --exclude=./out --exclude=./.venv "
      f"-czf {tarball} .",
      f"gcloud compute tpus tpu-vm scp {tarball} my-tpu:{tarball} "
      "--zone=us-central2-b --worker=all",
      f"{SSH} --worker=all --command='mkdir -p debiformer-jax && "
      f"tar -xzf {tarball} -C debiformer-jax && cd debiformer-jax && "
      "python3 -m pip install -U pip && "
      "python3 -m pip install -r requirements.txt \"jax[tpu]\"'",
  ]


def test_tpu_setup_git_clone(dry):
  out = lines(dry(TPU, "setup", "--dry-run", "--name", "my-tpu", "--zone",
                  "us-central2-b", "--repo-url", "https://github.com/me/debiformer-jax.git",
                  "--branch", "main", "--remote-dir", "src/dbf", "--project", "p"))
  assert out == [
      "gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --project=p "
      "--worker=all --command='if [ -d src/dbf/.git ]; then git -C src/dbf pull "
      "--ff-only; else git clone --branch main "
      "https://github.com/me/debiformer-jax.git src/dbf; fi && cd src/dbf && "
      "python3 -m pip install -U pip && "
      "python3 -m pip install -r requirements.txt \"jax[tpu]\"'"]


def test_tpu_run(dry):
  result = dry(TPU, "run", "--dry-run", "--name", "my-tpu", "--zone", "us-central2-b",
               "--config", "configs/small.py", "--workdir", "gs://bkt/runs/small",
               "--data-dir", "gs://bkt/tensorflow_datasets", "--",
               "--config.global_batch_size=2048", "--config.num_epochs=300")
  out = lines(result)
  assert out == [
      f"{SSH} --worker=all --command='cd debiformer-jax && mkdir -p $HOME/debiformer-logs "
      "&& nohup python3 -m debiformer_jax.main --config=configs/small.py "
      "--workdir=gs://bkt/runs/small --config.data.data_dir=gs://bkt/tensorflow_datasets "
      "--config.global_batch_size=2048 --config.num_epochs=300 "
      f"> {LOG} 2>&1 < /dev/null &'"]
  assert result.stderr == ""
  line = out[0]
  for needle in ("--worker=all", "--zone=us-central2-b", "--config=configs/small.py",
                 "nohup", "debiformer_jax.main"):
    assert needle in line


def test_tpu_run_quotes_awkward_arguments(dry):
  out = lines(dry(TPU, "run", "--dry-run", "--name", "my-tpu", "--zone", "us-central2-b",
                  "--workdir", "gs://b/w", "--", "--config.note=a b", "it's"))
  argv = shlex.split(out[0])
  command = [a for a in argv if a.startswith("--command=")][0][len("--command="):]
  remote = shlex.split(command)
  main = remote[remote.index("nohup") + 1:remote.index(">")]
  assert main == ["python3", "-m", "debiformer_jax.main", "--config=configs/small.py",
                  "--workdir=gs://b/w", "--config.note=a b", "it's"]


def test_tpu_run_warns_about_local_workdir(dry):
  result = dry(TPU, "run", "--dry-run", "--name", "t", "--zone", "z", "--workdir", "/tmp/w")
  assert result.returncode == 0
  assert "not on GCS" in result.stderr
  assert "--workdir=/tmp/w" in result.stdout


def test_tpu_logs_stop_delete(dry):
  common = ("--dry-run", "--name", "my-tpu", "--zone", "us-central2-b")
  assert lines(dry(TPU, "logs", *common)) == [
      f"{SSH} --worker=0 --command='tail -n 100 {LOG}'"]
  assert lines(dry(TPU, "logs", *common, "--worker", "3", "--lines", "20", "-f")) == [
      f"{SSH} --worker=3 --command='tail -n 20 -F {LOG}'"]
  pat = '"[d]ebiformer_jax[.]main"'
  assert lines(dry(TPU, "stop", *common)) == [
      f"{SSH} --worker=all --command='pkill -TERM -f {pat} || exit 0; "
      f"for i in $(seq 120); do pgrep -f {pat} > /dev/null || exit 0; sleep 1; done; "
      f"pkill -KILL -f {pat}; true'"]
  assert "$(seq 5)" in lines(dry(TPU, "stop", *common, "--grace", "5"))[0]
  assert lines(dry(TPU, "delete", *common)) == [
      "gcloud compute tpus tpu-vm delete my-tpu --zone=us-central2-b"]
  assert lines(dry(TPU, "delete", *common, "--yes")) == [
      "gcloud compute tpus tpu-vm delete my-tpu --zone=us-central2-b --quiet"]


@pytest.mark.parametrize("args, needles", [
    ((), ["missing COMMAND"]),
    (("--dry-run",), ["missing COMMAND"]),
    (("frobnicate", "--name", "t", "--zone", "z"), ["unknown command"]),
    (("create", "--zone", "z", "--accelerator-type", "v4-8"), ["--name"]),
    (("create", "--name", "t", "--accelerator-type", "v4-8"), ["--zone"]),
    (("create", "--name", "t", "--zone", "z"), ["--accelerator-type"]),
    (("create", "--name", "t", "--zone", "z", "--accelerator-type", "v4-8", "--spot",
      "--preemptible"), ["exclusive"]),
    (("run", "--name", "t", "--zone", "z"), ["--workdir"]),
    (("run", "--name", "t", "--zone", "z", "--workdir"), ["needs a value"]),
    (("logs", "--name", "t", "--zone", "z", "--worker", "x"), ["--worker"]),
    (("stop", "--name", "t", "--zone", "z", "--grace", "soon"), ["--grace"]),
    (("logs", "--name", "t", "--zone", "z", "--", "--x=1"), ["only for 'run'"]),
    (("setup", "--name", "t", "--zone", "z", "--branch", "b"), ["--repo-url"]),
    (("delete", "--name", "t", "--zone", "z", "--bogus"), ["unknown option"]),
    (("delete", "--name", "t", "--zone", "z", "--spot=1"), ["does not take a value"]),
    (("run", "delete", "--name", "t", "--zone", "z"), ["unexpected argument"]),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_tpu_usage_errors(dry, args, needles, dry_run):
  # Also without --dry-run: validation fails before anything could run.
  result = dry(TPU, *(("--dry-run",) if dry_run else ()), *args)
  assert_usage_error(result, *needles)


def test_tpu_dry_run_matches_execution(dry, real):
  cases = [
      ("create", "--name", "my-tpu", "--zone", "us-central2-b", "--accelerator-type",
       "v4-32", "--spot", "--project", "p"),
      ("setup", "--name", "my-tpu", "--zone", "us-central2-b"),
      ("run", "--name", "my-tpu", "--zone", "us-central2-b", "--workdir", "gs://b/w",
       "--data-dir", "gs://b/d", "--", "--config.note=a b", "it's"),
      ("logs", "--name", "my-tpu", "--zone", "us-central2-b", "-f"),
      ("stop", "--name", "my-tpu", "--zone", "us-central2-b"),
      ("delete", "--name", "my-tpu", "--zone", "us-central2-b", "--yes"),
  ]
  expected = []
  for case in cases:
    expected += [shlex.split(line) for line in lines(dry(TPU, "--dry-run", *case))]
    result = real(TPU, *case)
    assert result.returncode == 0, result.stderr
  assert real.recorded() == expected


# --------------------------------------------------------------------------- #
# slurm_gpu.sh / slurm_gpu.sbatch
# --------------------------------------------------------------------------- #


def test_slurm_wrapper(dry):
  out = lines(dry(SLURM, "--dry-run", "--nodes", "4", "--gpus-per-node", "8",
                  "--partition", "gpu", "--account", "acc", "--time", "12:00:00",
                  "--python", "/shared/venv/bin/python", "--requeue",
                  "--config", "configs/small.py", "--workdir", "/shared/runs/small",
                  "--data-dir", "/shared/tfds", "--", "--config.global_batch_size=1024"))
  main = ("--config=configs/small.py --workdir=/shared/runs/small "
          "--config.data.data_dir=/shared/tfds --config.global_batch_size=1024")
  assert out == [
      "sbatch --job-name=debiformer --nodes=4 --ntasks-per-node=8 --gres=gpu:8 "
      f"--cpus-per-task=8 --time=12:00:00 --chdir={REPO} --partition=gpu --account=acc "
      "--requeue --export=ALL,DEBIFORMER_PYTHON=/shared/venv/bin/python "
      f"{SBATCH} {main}",
      "# job step on each of the 4 node(s), 8 task(s) per node: "
      "srun --kill-on-bad-exit=1 --cpus-per-task=8 /shared/venv/bin/python "
      f"-m debiformer_jax.main {main}",
  ]


def test_slurm_wrapper_defaults_and_env(dry):
  out = lines(dry(SLURM, "--dry-run", env=dict(
      WORKDIR="/w", NODES="2", GPUS_PER_NODE="4", PARTITION="a100")))
  assert out[0] == (
      "sbatch --job-name=debiformer --nodes=2 --ntasks-per-node=4 --gres=gpu:4 "
      f"--cpus-per-task=8 --time=48:00:00 --chdir={REPO} --partition=a100 "
      f"{SBATCH} --config=configs/small.py --workdir=/w")
  assert out[1].endswith(
      "srun --kill-on-bad-exit=1 --cpus-per-task=8 python -m debiformer_jax.main "
      "--config=configs/small.py --workdir=/w")


@pytest.mark.parametrize("args, needles", [
    ((), ["--workdir"]),
    (("--dry-run",), ["--workdir"]),
    (("--dry-run", "--workdir", "/w", "--nodes", "0"), ["--nodes"]),
    (("--dry-run", "--workdir", "/w", "--gpus-per-node", "eight"), ["--gpus-per-node"]),
    (("--dry-run", "--workdir", "/w", "--bogus"), ["unknown argument"]),
    (("--dry-run", "--workdir"), ["needs a value"]),
])
def test_slurm_wrapper_usage_errors(dry, args, needles):
  assert_usage_error(dry(SLURM, *args), *needles)


def test_slurm_wrapper_dry_run_matches_execution(dry, real):
  args = ("--nodes", "2", "--gpus-per-node", "4", "--workdir", "/shared/w", "--",
          "--config.note=a b")
  expected = shlex.split(lines(dry(SLURM, "--dry-run", *args))[0])
  result = real(SLURM, *args)
  assert result.returncode == 0, result.stderr
  assert real.recorded() == [expected]


def test_sbatch_script_dry_run(dry):
  out = lines(dry(SBATCH, "--dry-run", "--config=configs/small.py", "--workdir=/w",
                  "--config.data.data_dir=/d", via_bash=True))
  assert out == ["srun --kill-on-bad-exit=1 python -m debiformer_jax.main "
                 "--config=configs/small.py --workdir=/w --config.data.data_dir=/d"]
  out = lines(dry(SBATCH, "--dry-run", "--config.x=1", via_bash=True, env=dict(
      CONFIG="configs/tiny.py", WORKDIR="/w2", DATA_DIR="/d2", SLURM_CPUS_PER_TASK="12",
      DEBIFORMER_PYTHON="/venv/bin/python")))
  assert out == ["srun --kill-on-bad-exit=1 --cpus-per-task=12 /venv/bin/python -m "
                 "debiformer_jax.main --config=configs/tiny.py --workdir=/w2 "
                 "--config.data.data_dir=/d2 --config.x=1"]


def test_sbatch_script_needs_workdir(dry):
  result = dry(SBATCH, "--dry-run", "--config=configs/small.py", via_bash=True)
  assert result.returncode == 2 and "--workdir" in result.stderr


def test_sbatch_script_runs_srun_in_job(real):
  # What SLURM does with the script: run it (from the spool) inside the job.
  result = real(SBATCH, "--config=configs/small.py", "--workdir=/w", via_bash=True,
                env=dict(SLURM_JOB_ID="77", SLURM_CPUS_PER_TASK="6"))
  assert result.returncode == 0, result.stderr
  assert real.recorded() == [[
      "srun", "--kill-on-bad-exit=1", "--cpus-per-task=6", "python", "-m",
      "debiformer_jax.main", "--config=configs/small.py", "--workdir=/w"]]


def test_sbatch_directives():
  with open(SBATCH) as f:
    directives = [l.split(None, 1)[1].strip() for l in f if l.startswith("#SBATCH")]
  assert "--ntasks-per-node=8" in directives
  assert "--gres=gpu:8" in directives
  assert "--signal=USR1@300" in directives
  assert any(d.startswith("--nodes=") for d in directives)


def test_fakes_catch_execution(dry):
  # Sanity check of the harness: without --dry-run the fake gcloud is reached.
  result = dry(TPU, "delete", "--name", "t", "--zone", "z")
  assert result.returncode == 97
  assert dry.calls() == "gcloud compute tpus tpu-vm delete t --zone=z\n"
  os.remove(dry.calls_file)  # so that the fixture's own check passes


@pytest.mark.parametrize("sub, extra", [
    ("setup", ()), ("setup", ("--repo-url", "https://example.com/r.git")),
    ("run", ("--workdir", "gs://b/w", "--", "--config.note=a b")),
    ("logs", ("-f",)), ("stop", ()),
])
def test_tpu_remote_commands_are_valid_bash(dry, sub, extra):
  out = lines(dry(TPU, sub, "--dry-run", "--name", "t", "--zone", "z", *extra))
  command = [a for a in shlex.split(out[-1]) if a.startswith("--command=")][0]
  subprocess.run(["bash", "-n", "-c", command[len("--command="):]], check=True, timeout=10)
