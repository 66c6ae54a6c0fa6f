"""Tests for launch/tpu_pod.sh, launch/slurm.sbatch and the commands in launch/README.md.

The scripts run with fake gcloud / sbatch / srun / tar first on PATH. The fakes
record their argv and succeed, so a dry run must record nothing, and a real run
must pass the fakes exactly the commands its dry run prints. The remote command
strings go through `bash -n`, and `run`'s and `logs`' through bash itself.
"""

import os
import re
import shlex
import shutil
import socket
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, 'launch', 'tpu_pod.sh')
SBATCH = os.path.join(REPO, 'launch', 'slurm.sbatch')
README = os.path.join(REPO, 'launch', 'README.md')

FAKED = ('gcloud', 'sbatch', 'srun', 'tar')
# Read by the scripts or set by SLURM: cleared so that the caller's environment cannot leak in.
CLEARED = ('TPU_NAME', 'ZONE', 'PROJECT', 'PYTHON', 'SLURM_CPUS_PER_TASK', 'SLURM_JOB_ID')
# Records argv, NUL-separated, one call per line; exits with FAKE_RC (default 0).
RECORDER = """#!/bin/bash
{ printf '%s\\0' "$(basename "$0")" "$@"; printf '\\n'; } >> "$FAKE_CALLS"
exit "${FAKE_RC:-0}"
"""

SSH = 'gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b'
LOG = '$HOME/debiformer-logs/train-$(hostname).log'
INSTALL = 'cd debiformer-jax && python3 -m pip install -r requirements.txt "jax[tpu]"'
TARBALL = '/tmp/debiformer-jax-src.tar.gz'
WHERE = ('--name', 'my-tpu', '--zone', 'us-central2-b')


def write_executable(path, text):
  with open(path, 'w') as f:
    f.write(text)
  os.chmod(path, 0o755)


class Fakes:
  """Runs commands with the recording fakes first on PATH."""

  def __init__(self, tmp_path):
    self.bin = str(tmp_path / 'bin')
    os.makedirs(self.bin)
    for name in FAKED:
      write_executable(os.path.join(self.bin, name), RECORDER)
    self.calls_file = str(tmp_path / 'calls')

  def env(self, extra=None):
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env['PATH'] = self.bin + os.pathsep + env['PATH']
    env['FAKE_CALLS'] = self.calls_file
    env.update(extra or {})
    return env

  def __call__(self, *argv, env=None, cwd=REPO):
    return subprocess.run(list(argv), env=self.env(env), cwd=cwd, capture_output=True,
                          text=True, timeout=30)

  def calls(self):
    if not os.path.exists(self.calls_file):
      return []
    with open(self.calls_file) as f:
      return [chunk.split('\0') for chunk in f.read().split('\0\n') if chunk]


@pytest.fixture
def fake(tmp_path):
  return Fakes(tmp_path)


def dry(fake, *argv, env=None, cwd=REPO):
  """The lines a dry run prints; it must succeed, be quiet on stderr and run nothing."""
  before = fake.calls()
  result = fake(*argv, env=env, cwd=cwd)
  assert result.returncode == 0, result.stderr
  assert result.stderr == ''
  assert fake.calls() == before
  return result.stdout.splitlines()


def assert_usage_error(fake, result, needle):
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert result.stdout == ''
  assert len(result.stderr.splitlines()) == 1, result.stderr
  assert 'error' in result.stderr and needle in result.stderr
  assert fake.calls() == []


def remote_command(line):
  """The --command= of a printed `gcloud ... ssh` line, checked with `bash -n`."""
  commands = [a for a in shlex.split(line) if a.startswith('--command=')]
  assert len(commands) == 1, line
  command = commands[0][len('--command='):]
  subprocess.run(['bash', '-n', '-c', command], check=True, timeout=10)
  return command


# --------------------------------------------------------------------------- #
# Both scripts
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize('script', [TPU, SBATCH])
def test_script_is_strict_bash(script):
  with open(script) as f:
    text = f.read()
  assert text.startswith('#!/usr/bin/env bash\n')
  assert '\nset -euo pipefail\n' in text
  assert os.access(script, os.X_OK)
  subprocess.run(['bash', '-n', script], check=True, timeout=10)


def test_readme_covers_every_script():
  with open(README) as f:
    text = f.read()
  scripts = sorted(set(os.listdir(os.path.dirname(README))) - {'README.md'})
  assert scripts == ['slurm.sbatch', 'tpu_pod.sh']
  for name in scripts:
    assert f'| `{name}` |' in text, name


# --------------------------------------------------------------------------- #
# tpu_pod.sh
# --------------------------------------------------------------------------- #


def test_tpu_help(fake):
  out = '\n'.join(dry(fake, TPU, '--help'))
  assert out.startswith('Usage: tpu_pod.sh COMMAND')
  for word in ('create', 'setup', 'run', 'logs', 'stop', 'delete', '--name', '--zone',
               '--project', '--accelerator-type', '--version', '--spot', '--preemptible',
               '--repo-url', '--worker', '--follow', '--yes', '--dry-run'):
    assert word in out


def test_tpu_create(fake):
  assert dry(fake, TPU, '--dry-run', 'create', *WHERE, '--accelerator-type', 'v4-32',
             '--spot') == [
      'gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b '
      '--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot']


def test_tpu_environment_defaults(fake):
  env = dict(TPU_NAME='pod1', ZONE='us-east5-b', PROJECT='my-proj')
  assert dry(fake, TPU, 'create', '--dry-run', '--preemptible', '--accelerator-type',
             'v6e-16', '--version', 'v2-alpha-tpuv6e', env=env) == [
      'gcloud compute tpus tpu-vm create pod1 --zone=us-east5-b --project=my-proj '
      '--accelerator-type=v6e-16 --version=v2-alpha-tpuv6e --preemptible']
  # Flags win over the environment, in either spelling; no zone leaves it to gcloud.
  assert dry(fake, TPU, 'delete', '--dry-run', '--name=n2', '--project', 'p2',
             env=dict(TPU_NAME='n1', PROJECT='p1')) == [
      'gcloud compute tpus tpu-vm delete n2 --project=p2']


def test_tpu_setup_copies_checkout(fake):
  assert dry(fake, TPU, 'setup', '--dry-run', *WHERE) == [
      f'tar -C {REPO} --exclude=./.git --exclude=__pycache__ --exclude=.pytest_cache '
      f"--exclude='./workdir*' --exclude=./runs --exclude=./out -czf {TARBALL} .",
      f'gcloud compute tpus tpu-vm scp {TARBALL} my-tpu:{TARBALL} '
      '--zone=us-central2-b --worker=all',
      f"{SSH} --worker=all --command='mkdir -p debiformer-jax && "
      f"tar -xzf {TARBALL} -C debiformer-jax && {INSTALL}'",
  ]


def test_tpu_setup_archive_holds_the_code_only(fake, tmp_path):
  # Run the printed tar for real (into tmp_path) on a copy of the checkout with run output in it.
  src = tmp_path / 'src'
  shutil.copytree(REPO, src, ignore=shutil.ignore_patterns('.git', '__pycache__'))
  for junk in ('.git/config', 'workdir_small/ckpt', 'runs/a/events', 'out/x',
               'pkg/__pycache__/m.pyc'):
    os.makedirs(os.path.dirname(src / junk), exist_ok=True)
    (src / junk).write_text('junk')
  shutil.copy(TPU, src / 'launch' / 'tpu_pod.sh')
  tar = shlex.split(dry(fake, str(src / 'launch' / 'tpu_pod.sh'), 'setup', '--dry-run',
                        '--name', 't')[0])
  tar[tar.index('-czf') + 1] = str(tmp_path / 'src.tar.gz')
  subprocess.run(tar, check=True, timeout=30)
  names = subprocess.run(['tar', '-tzf', str(tmp_path / 'src.tar.gz')], check=True,
                         capture_output=True, text=True, timeout=30).stdout.split()
  for wanted in ('./requirements.txt', './debiformer_jax/main.py', './configs/small.py'):
    assert wanted in names
  for name in names:
    assert not re.match(r'\./(\.git|workdir|runs|out)\b', name), name
    assert '__pycache__' not in name


def test_tpu_setup_git_clone(fake):
  out = dry(fake, TPU, 'setup', '--dry-run', *WHERE, '--repo-url',
            'https://github.com/me/debiformer-jax.git')
  assert out == [
      f"{SSH} --worker=all --command='if [ -d debiformer-jax/.git ]; then git -C "
      'debiformer-jax pull --ff-only; else git clone https://github.com/me/debiformer-jax.git '
      f"debiformer-jax; fi && {INSTALL}'"]
  # An awkward URL stays one word on the worker.
  command = remote_command(dry(fake, TPU, 'setup', '--dry-run', '--name', 't', '--repo-url',
                               "/srv/my repo's.git")[0])
  assert "git clone /srv/my\\ repo\\'s.git debiformer-jax" in command


def test_tpu_run(fake):
  assert dry(fake, TPU, 'run', '--dry-run', *WHERE, '--', '--config=configs/small.py',
             '--workdir=gs://bkt/runs/small', '--config.data.data_dir=gs://bkt/tfds') == [
      f"{SSH} --worker=all --command='cd debiformer-jax && mkdir -p $HOME/debiformer-logs "
      '&& nohup python3 -m debiformer_jax.main --config=configs/small.py '
      '--workdir=gs://bkt/runs/small --config.data.data_dir=gs://bkt/tfds '
      f"> {LOG} 2>&1 < /dev/null &'"]


def test_tpu_run_command_works_on_a_worker(fake, tmp_path):
  # Run the remote command with bash as a worker would, in a home directory
  # holding the code and a fake python3, with arguments bash must not touch.
  main_args = ['--workdir=gs://b/w', '--config.note=a b', "it's", '$HOME', '*', '']
  line = dry(fake, TPU, 'run', '--dry-run', '--name', 't', '--', *main_args)[0]
  home = tmp_path / 'home'
  os.makedirs(home / 'debiformer-jax')
  record = tmp_path / 'python3.argv'
  write_executable(str(tmp_path / 'bin' / 'python3'),
                   '#!/bin/bash\n'
                   f'printf "%s\\0" "$PWD" "$@" > {record}.part && mv {record}.part {record}\n'
                   'echo training\n')
  subprocess.run(['bash', '-c', remote_command(line)], env=fake.env(dict(HOME=str(home))),
                 cwd=home, check=True, timeout=10)
  deadline = time.time() + 10
  while not record.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert record.read_text().split('\0')[:-1] == [
      str(home / 'debiformer-jax'), '-m', 'debiformer_jax.main', *main_args]
  log = home / 'debiformer-logs' / f'train-{socket.gethostname()}.log'
  deadline = time.time() + 10
  while log.read_text() != 'training\n' and time.time() < deadline:
    time.sleep(0.05)
  assert log.read_text() == 'training\n'


def test_tpu_run_warns_about_a_workdir_off_gcs(fake):
  result = fake(TPU, 'run', '--dry-run', '--name', 't', '--', '--workdir=/tmp/w')
  assert result.returncode == 0
  assert 'not on GCS' in result.stderr
  assert '--workdir=/tmp/w' in result.stdout


def test_tpu_logs(fake, tmp_path):
  assert dry(fake, TPU, 'logs', '--dry-run', *WHERE) == [
      f"{SSH} --worker=0 --command='tail -n 100 {LOG}'"]
  line = dry(fake, TPU, 'logs', '--dry-run', *WHERE, '--worker', '3', '--follow')[0]
  assert line == f"{SSH} --worker=3 --command='tail -n 100 -F {LOG}'"
  # Without --follow, the command shows the end of this worker's log and returns.
  home = tmp_path / 'home'
  os.makedirs(home / 'debiformer-logs')
  log = home / 'debiformer-logs' / f'train-{socket.gethostname()}.log'
  log.write_text(''.join(f'{i}\n' for i in range(150)))
  command = remote_command(dry(fake, TPU, 'logs', '--dry-run', '--name', 't')[0])
  shown = subprocess.run(['bash', '-c', command], env=dict(os.environ, HOME=str(home)),
                         capture_output=True, text=True, check=True, timeout=10).stdout
  assert shown.split() == [str(i) for i in range(50, 150)]


def test_tpu_stop(fake):
  line = dry(fake, TPU, 'stop', '--dry-run', *WHERE)[0]
  assert line.startswith(f'{SSH} --worker=all --command=')
  command = remote_command(line)
  pattern = re.match(r'p="([^"]+)"; ', command).group(1)
  assert command == (
      f'p="{pattern}"; pkill -TERM -f "$p" || exit 0; for i in $(seq 120); do '
      'pgrep -f "$p" > /dev/null || exit 0; sleep 1; done; pkill -KILL -f "$p" || true')
  # pkill -f matches whole command lines: the training's, not that of the shell running this.
  assert re.search(pattern, 'python3 -m debiformer_jax.main --workdir=gs://b/w')
  assert not re.search(pattern, command)


def test_tpu_delete(fake):
  assert dry(fake, TPU, 'delete', '--dry-run', *WHERE) == [
      'gcloud compute tpus tpu-vm delete my-tpu --zone=us-central2-b']
  assert dry(fake, TPU, 'delete', '--dry-run', *WHERE, '--yes') == [
      'gcloud compute tpus tpu-vm delete my-tpu --zone=us-central2-b --quiet']


@pytest.mark.parametrize('args, needle', [
    ((), 'missing COMMAND'),
    (('--dry-run', '--name', 't'), 'missing COMMAND'),
    (('frobnicate', '--name', 't'), 'unknown command frobnicate'),
    (('create', '--accelerator-type', 'v4-8'), '--name'),
    (('create', '--name', 't'), '--accelerator-type'),
    (('run', '--name', 't'), '--workdir'),
    (('run', '--name', 't', '--', '--workdir', 'gs://b/w'), '--workdir'),
    (('run', '--name', 't', '--workdir=gs://b/w'), 'unknown option --workdir'),
    (('logs', '--name'), '--name needs a value'),
    (('delete', '--name', 't', '--bogus'), 'unknown option --bogus'),
    (('run', 'delete', '--name', 't'), 'unexpected argument delete'),
])
@pytest.mark.parametrize('dry_run', [True, False])
def test_tpu_usage_errors(fake, args, needle, dry_run):
  # Also without --dry-run: the arguments are checked before anything runs.
  result = fake(TPU, *(('--dry-run',) if dry_run else ()), *args)
  assert_usage_error(fake, result, needle)


def test_tpu_dry_run_is_what_runs(fake):
  cases = [
      ('create', *WHERE, '--accelerator-type', 'v4-32', '--spot', '--project', 'p'),
      ('setup', *WHERE),
      ('setup', *WHERE, '--repo-url', 'https://example.com/r.git'),
      ('run', *WHERE, '--', '--workdir=gs://b/w', '--config.note=a b', "it's"),
      ('logs', *WHERE, '--follow'),
      ('stop', *WHERE),
      ('delete', *WHERE, '--yes'),
  ]
  expected = []
  for case in cases:
    printed = dry(fake, TPU, '--dry-run', *case)
    expected += [shlex.split(line) for line in printed]
    result = fake(TPU, *case)
    assert result.returncode == 0, result.stderr
    # A real run shows each command on stderr as it starts it.
    assert result.stderr.splitlines() == [f'+ {line}' for line in printed]
  assert fake.calls() == expected


def test_tpu_stops_at_the_first_failing_command(fake):
  result = fake(TPU, 'setup', '--name', 't', env=dict(FAKE_RC='3'))
  assert result.returncode == 3
  assert [call[0] for call in fake.calls()] == ['tar']


# --------------------------------------------------------------------------- #
# slurm.sbatch
# --------------------------------------------------------------------------- #

MAIN = ['--config=configs/small.py', '--workdir=/shared/w', '--config.data.data_dir=/d']


def test_sbatch_directives():
  with open(SBATCH) as f:
    text = f.read()
  # sbatch reads #SBATCH lines only up to the first command of the script.
  header = text[:text.index('\nset -euo pipefail\n')]
  assert all(l.startswith('#') for l in header.splitlines())
  assert re.findall(r'^#SBATCH (\S+)$', header, re.M) == [
      '--job-name=debiformer', '--ntasks-per-node=8', '--gres=gpu:8', '--cpus-per-task=8',
      '--signal=USR1@300', '--output=slurm-%x-%j.out', '--open-mode=append']
  assert len(re.findall('^#SBATCH', text, re.M)) == 7


def test_sbatch_help(fake):
  out = dry(fake, 'bash', SBATCH, '--help')
  assert out[0].startswith('Multi-node GPU training of debiformer-jax under SLURM')
  assert '  sbatch --nodes=2 --ntasks-per-node=8 --gres=gpu:8 --partition=gpu \\' in out
  assert '--dry-run' in '\n'.join(out)
  assert not any(l.startswith('#') for l in out)


def test_sbatch_dry_run(fake):
  assert dry(fake, 'bash', SBATCH, '--dry-run', *MAIN) == [
      'srun --kill-on-bad-exit=1 python -m debiformer_jax.main ' + ' '.join(MAIN)]
  out = dry(fake, 'bash', SBATCH, '--dry-run', '--workdir', '/w', '--config.note=a b',
            env=dict(PYTHON='/venv/bin/python', SLURM_CPUS_PER_TASK='12'))
  assert [shlex.split(l) for l in out] == [[
      'srun', '--kill-on-bad-exit=1', '--cpus-per-task=12', '/venv/bin/python', '-m',
      'debiformer_jax.main', '--workdir', '/w', '--config.note=a b']]


def test_sbatch_in_a_job_runs_srun(fake, tmp_path):
  # What SLURM does: run a copy of the script from its spool directory, in the
  # directory the job was submitted from, with the job's environment.
  spool = tmp_path / 'spool'
  os.makedirs(spool)
  shutil.copy(SBATCH, spool / 'slurm_script')
  env = dict(SLURM_JOB_ID='77', SLURM_CPUS_PER_TASK='6', PYTHON='/venv/bin/python')
  main = MAIN + ['--config.note=a b', "it's"]
  result = fake('bash', str(spool / 'slurm_script'), *main, env=env)
  assert result.returncode == 0, result.stderr
  srun = ['srun', '--kill-on-bad-exit=1', '--cpus-per-task=6', '/venv/bin/python', '-m',
          'debiformer_jax.main', *main]
  assert fake.calls() == [srun]
  # The job log shows what ran, and its dry run says the same.
  assert [shlex.split(l) for l in result.stderr.splitlines()] == [['+', *srun]]
  assert shlex.split(dry(fake, 'bash', SBATCH, '--dry-run', *main, env=env)[0]) == srun
  # srun's failure is the job's failure.
  result = fake('bash', str(spool / 'slurm_script'), *main, env=dict(env, FAKE_RC='5'))
  assert result.returncode == 5


@pytest.mark.parametrize('args, cwd, needle', [
    (('--config=configs/small.py',), REPO, '--workdir'),
    (('--dry-run', '--config=configs/small.py', '--workdir='), REPO, '--workdir'),
    (('--dry-run', *MAIN), '/', 'repository root'),
])
def test_sbatch_usage_errors(fake, args, cwd, needle):
  assert_usage_error(fake, fake('bash', SBATCH, *args, cwd=cwd), needle)


# --------------------------------------------------------------------------- #
# launch/README.md
# --------------------------------------------------------------------------- #


def readme_commands(prefixes):
  """The README's indented command lines that start with one of prefixes, continuations joined."""
  with open(README) as f:
    text = f.read().replace('\\\n', ' ')
  commands = []
  for line in text.splitlines():
    line = line.strip()
    if line.startswith(prefixes):
      commands.append(shlex.split(line.replace('$BUCKET', 'gs://bkt'), comments=True))
  return commands


def assert_main_args(args):
  for arg in args:
    assert re.fullmatch(r'--(config|workdir)=\S+|--config\.[a-z_]+(\.[a-z_]+)*=\S+', arg), arg


def test_readme_names_existing_files_only():
  with open(README) as f:
    text = f.read()
  for path in set(re.findall(r'\b(?:launch|tests|debiformer_jax|configs)/[\w./]*\w', text)):
    assert os.path.exists(os.path.join(REPO, path)) or path == 'debiformer_jax/preemption.py', path


def test_readme_tpu_commands_dry_run(fake):
  commands = readme_commands(('launch/tpu_pod.sh ',))
  assert {c[1] for c in commands} == {'create', 'setup', 'run', 'logs', 'stop', 'delete'}
  for command in commands:
    dry(fake, TPU, '--dry-run', *command[1:], env=dict(TPU_NAME='t', ZONE='z'))
    if '--' in command:
      assert_main_args(command[command.index('--') + 1:])


def test_readme_slurm_commands(fake):
  submit, dry_run = readme_commands(('PYTHON=', 'sbatch ', 'bash launch/slurm.sbatch '))
  # Submit as the README does, then run the script with what sbatch got, as SLURM would.
  assert fake('bash', '-c', shlex.join(submit)).returncode == 0
  (sbatch,) = fake.calls()
  script = next(i for i, a in enumerate(sbatch) if i and not a.startswith('-'))
  assert sbatch[script] == 'launch/slurm.sbatch'
  main = sbatch[script + 1:]
  assert_main_args(main)
  python = submit[0].split('=', 1)[1]
  result = fake('bash', sbatch[script], *main, env=dict(PYTHON=python, SLURM_CPUS_PER_TASK='8'))
  assert result.returncode == 0, result.stderr
  assert fake.calls()[1:] == [['srun', '--kill-on-bad-exit=1', '--cpus-per-task=8', python,
                               '-m', 'debiformer_jax.main', *main]]
  # The README's dry run, as written.
  assert dry_run[:3] == ['bash', 'launch/slurm.sbatch', '--dry-run']
  assert_main_args(dry_run[3:])
  assert dry(fake, *dry_run) == [
      'srun --kill-on-bad-exit=1 python -m debiformer_jax.main ' + ' '.join(dry_run[3:])]
