#!/usr/bin/env bash
# Create, set up, run on, watch, stop and delete a Cloud TPU VM (one host or a
# pod slice) for debiformer-jax, through `gcloud compute tpus tpu-vm`.
# `launch/tpu_pod.sh --help` lists the commands; launch/README.md walks through a run.
set -euo pipefail

prog=$(basename "$0")
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $prog COMMAND [options] [--dry-run] [-- main args]

Commands
  create   create the TPU VM: --accelerator-type TYPE [--version V] [--spot | --preemptible]
  setup    copy this checkout to every worker (or git clone --repo-url URL there)
           and pip install -r requirements.txt "jax[tpu]"
  run      start \`python3 -m debiformer_jax.main\` plus the main args after -- on
           every worker in the background; each worker logs to
           ~/debiformer-logs/train-<hostname>.log. The main args must include
           --workdir=gs://..., where all workers share the checkpoints.
  logs     print the last 100 lines of one worker's log: [--worker N] (default 0) [--follow]
  stop     SIGTERM the training on every worker (all processes save a checkpoint
           at the same step and exit); SIGKILL what still runs 120 s later
  delete   delete the TPU VM; gcloud asks for confirmation unless --yes

Options
  --name NAME   the TPU VM (default: \$TPU_NAME)
  --zone ZONE   e.g. us-central2-b (default: \$ZONE, else gcloud's compute/zone)
  --project P   (default: \$PROJECT, else gcloud's project)
  --version V   TPU runtime, default tpu-ubuntu2204-base (v4, v5p);
                v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv6e for v6e
  --dry-run     print each command it would run, one per line, and run nothing
  -h, --help    this help

Example
  $prog run --name my-tpu --zone us-central2-b -- --config=configs/small.py \\
      --workdir=gs://my-bucket/runs/small --config.data.data_dir=gs://my-bucket/tensorflow_datasets
EOF
}

usage_error() {
  echo "$prog: error: $* (see $prog --help)" >&2
  exit 2
}

# Print a command as a line that pastes back into bash: plain words as they are,
# others in single quotes (easier to read than printf %q's backslashes), with an
# option's "--name=" left outside them.
show() {
  local arg words=()
  for arg; do
    if [[ $(printf %q "$arg") == "$arg" ]]; then
      words+=("$arg")
    elif [[ $arg =~ ^(--[a-z-]+=)(.*)$ ]]; then
      words+=("${BASH_REMATCH[1]}${BASH_REMATCH[2]@Q}")
    else
      words+=("${arg@Q}")
    fi
  done
  echo "${words[*]}"
}

invoke() {
  if (( dry_run )); then show "$@"; return; fi
  echo "+ $(show "$@")" >&2
  "$@"
}

# Options that take a value, by name, with their defaults.
declare -A opt=([--name]=${TPU_NAME:-} [--zone]=${ZONE:-} [--project]=${PROJECT:-}
                [--version]=tpu-ubuntu2204-base [--accelerator-type]="" [--repo-url]=""
                [--worker]=0)
command=""
capacity=()
follow=""
quiet=()
dry_run=0
main=()
while (( $# )); do
  arg=$1
  shift
  # Read --opt=value as --opt value.
  if [[ $arg == --*=* ]]; then set -- "${arg#*=}" "$@"; arg=${arg%%=*}; fi
  case $arg in
    --name|--zone|--project|--version|--accelerator-type|--repo-url|--worker)
      (( $# )) || usage_error "$arg needs a value"
      opt[$arg]=$1
      shift ;;
    --spot|--preemptible) capacity+=("$arg") ;;
    --follow) follow=" -F" ;;
    --yes) quiet=(--quiet) ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) main=("$@"); break ;;
    -*) usage_error "unknown option $arg (main's own flags go after --)" ;;
    *)
      [[ -z $command ]] || usage_error "unexpected argument $arg"
      command=$arg ;;
  esac
done

case $command in
  create|setup|run|logs|stop|delete) ;;
  '') usage_error "missing COMMAND" ;;
  *) usage_error "unknown command $command" ;;
esac
[[ -n ${opt[--name]} ]] || usage_error "$command needs --name (or TPU_NAME)"

tpu=(gcloud compute tpus tpu-vm)
where=()
[[ -z ${opt[--zone]} ]] || where+=(--zone="${opt[--zone]}")
[[ -z ${opt[--project]} ]] || where+=(--project="${opt[--project]}")
on_workers() {  # worker (a number or all), remote command (run by its login shell)
  invoke "${tpu[@]}" ssh "${opt[--name]}" "${where[@]}" --worker="$1" --command="$2"
}

# TPU VM images have python3 but no `python`.
install='cd debiformer-jax && python3 -m pip install -r requirements.txt "jax[tpu]"'
logs='$HOME/debiformer-logs'
log="$logs/train-\$(hostname).log"

case $command in
  create)
    [[ -n ${opt[--accelerator-type]} ]] || usage_error "create needs --accelerator-type, e.g. v4-32"
    invoke "${tpu[@]}" create "${opt[--name]}" "${where[@]}" \
      --accelerator-type="${opt[--accelerator-type]}" --version="${opt[--version]}" "${capacity[@]}" ;;
  setup)
    if [[ -n ${opt[--repo-url]} ]]; then
      printf -v url %q "${opt[--repo-url]}"
      on_workers all "if [ -d debiformer-jax/.git ]; then git -C debiformer-jax pull --ff-only; else git clone $url debiformer-jax; fi && $install"
    else
      # The working tree as it is, uncommitted changes included, but without .git,
      # caches and local run directories (those in .gitignore).
      tarball=/tmp/debiformer-jax-src.tar.gz
      invoke tar -C "$repo" --exclude=./.git --exclude=__pycache__ --exclude=.pytest_cache \
        --exclude='./workdir*' --exclude=./runs --exclude=./out -czf "$tarball" .
      invoke "${tpu[@]}" scp "$tarball" "${opt[--name]}:$tarball" "${where[@]}" --worker=all
      on_workers all "mkdir -p debiformer-jax && tar -xzf $tarball -C debiformer-jax && $install"
    fi ;;
  run)
    workdir=""
    for arg in "${main[@]}"; do
      if [[ $arg == --workdir=* ]]; then workdir=${arg#*=}; fi
    done
    [[ -n $workdir ]] || usage_error "run needs --workdir=gs://... after --"
    if [[ $workdir != gs://* ]]; then
      echo "$prog: warning: workdir $workdir is not on GCS: workers do not share it" >&2
    fi
    printf -v main_cmd '%q ' python3 -m debiformer_jax.main "${main[@]}"
    # nohup, the redirections and & let training outlive the ssh session.
    on_workers all "cd debiformer-jax && mkdir -p $logs && nohup ${main_cmd% } > $log 2>&1 < /dev/null &" ;;
  logs)
    on_workers "${opt[--worker]}" "tail -n 100$follow $log" ;;
  stop)
    # pkill -f matches whole command lines; written as [.], the pattern does not
    # match that of the shell running this very command. 120 s leaves time for
    # the checkpoint that SIGTERM starts.
    on_workers all 'p="debiformer_jax[.]main"; pkill -TERM -f "$p" || exit 0; for i in $(seq 120); do pgrep -f "$p" > /dev/null || exit 0; sleep 1; done; pkill -KILL -f "$p" || true' ;;
  delete)
    invoke "${tpu[@]}" delete "${opt[--name]}" "${where[@]}" "${quiet[@]}" ;;
esac
