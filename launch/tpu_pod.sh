#!/usr/bin/env bash
# Create, set up, run on, watch and delete a Cloud TPU VM (single host or pod
# slice) for debiformer-jax, through `gcloud compute tpus tpu-vm`.
# Run `launch/tpu_pod.sh --help` for usage; see launch/README.md for a walk-through.
set -euo pipefail

PROG=$(basename "$0")
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $PROG [--dry-run] COMMAND [options] [-- extra main.py args]

Commands
  create   Create the TPU VM:          --name --zone --accelerator-type [--version] [--spot|--preemptible]
  setup    Copy this repo to every worker (or git clone it with --repo-url) and
           pip install -r requirements.txt "jax[tpu]" on --worker=all
  run      Start training on every worker in the background (nohup), one log
           file per worker:           --workdir gs://... [--config] [--data-dir gs://...]
  logs     Print (or --follow) the log of one worker (--worker N, default 0)
  stop     Send SIGTERM to the training processes on all workers (they save a
           checkpoint at an agreed step and exit); SIGKILL after --grace seconds
  delete   Delete the TPU VM (asks for confirmation unless --yes)

Options (environment variable in brackets)
  --name NAME              TPU VM name [TPU_NAME]                       (required)
  --zone ZONE              e.g. us-central2-b [ZONE]                    (required)
  --project PROJECT        GCP project; gcloud's default if unset [PROJECT]
  --accelerator-type TYPE  e.g. v4-8, v4-32, v5litepod-16 [ACCELERATOR_TYPE] (create)
  --version VERSION        TPU runtime (alias --runtime-version) [RUNTIME_VERSION],
                           default tpu-ubuntu2204-base (v4/v5p; v5e: v2-alpha-tpuv5-lite,
                           v6e: v2-alpha-tpuv6e)
  --spot | --preemptible   Cheaper capacity that can be taken away (create)
  --repo-url URL           setup: git clone URL instead of copying this checkout [REPO_URL]
  --branch BRANCH          setup: branch or tag for --repo-url [BRANCH]
  --remote-dir DIR         Repo directory on the workers, relative to \$HOME
                           [REMOTE_DIR], default debiformer-jax
  --config PATH            run: config file, default configs/small.py [CONFIG]
  --workdir gs://...       run: checkpoints and TensorBoard logs [WORKDIR] (required)
  --data-dir gs://...      run: TFDS data_dir holding imagenet2012 [DATA_DIR]
  --python PYTHON          Python on the workers [PYTHON], default python3
  --worker N               logs: which worker, default 0
  --lines N                logs: lines to show, default 100
  --follow, -f             logs: keep following the log
  --grace SECONDS          stop: wait this long before SIGKILL, default 120
  --yes                    delete: do not ask for confirmation
  --dry-run                Print the commands, one per line, and run nothing
  -h, --help               This help

Anything after "--" is appended to the python -m debiformer_jax.main command
(e.g. -- --config.num_epochs=300).

Examples
  $PROG create --name my-tpu --zone us-central2-b --accelerator-type v4-32 --spot
  $PROG setup  --name my-tpu --zone us-central2-b
  $PROG run    --name my-tpu --zone us-central2-b --config configs/small.py \\
               --workdir gs://my-bucket/runs/small --data-dir gs://my-bucket/tensorflow_datasets
  $PROG logs   --name my-tpu --zone us-central2-b --worker 0 --follow
  $PROG delete --name my-tpu --zone us-central2-b
EOF
}

die_usage() {
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG --help' for usage." >&2
  exit 2
}

# Quote one argument so that the printed line can be pasted back into bash.
# A "--option=value" argument keeps "--option=" outside the quotes.
q() {
  local s=$1
  if [[ $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9][A-Za-z0-9._-]*=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    q "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

join_quoted() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}

DRY_RUN=0
run_cmd() {
  if (( DRY_RUN )); then
    join_quoted "$@"; echo
  else
    echo "+ $(join_quoted "$@")" >&2
    "$@"
  fi
}

# ----------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------
COMMAND=""
NAME=${TPU_NAME:-}
ZONE_=${ZONE:-}
PROJECT_=${PROJECT:-}
ACCEL=${ACCELERATOR_TYPE:-}
VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
CAPACITY=""
REPO_URL_=${REPO_URL:-}
BRANCH_=${BRANCH:-}
REMOTE_DIR_=${REMOTE_DIR:-debiformer-jax}
CONFIG_=${CONFIG:-configs/small.py}
WORKDIR_=${WORKDIR:-}
DATA_DIR_=${DATA_DIR:-}
PYTHON_=${PYTHON:-python3}
WORKER=0
LINES=100
GRACE=120
FOLLOW=0
YES=0
EXTRA=()

need_value() {  # option, remaining-arg-count
  (( $2 >= 2 )) || die_usage "$1 needs a value"
}

while (( $# )); do
  opt=$1
  val=""
  has_inline=0
  if [[ $opt == --*=* ]]; then
    val=${opt#*=}
    opt=${opt%%=*}
    has_inline=1
  fi
  # Options taking a value: read it inline (--opt=v) or from the next word.
  case $opt in
    --name|-n|--zone|-z|--project|--accelerator-type|--version|--runtime-version|\
    --repo-url|--branch|--remote-dir|--config|--workdir|--data-dir|--python|\
    --worker|--lines|--grace)
      if (( ! has_inline )); then
        need_value "$opt" $#
        val=$2
        shift
      fi
      ;;
    *)
      (( has_inline )) && die_usage "$opt does not take a value"
      ;;
  esac
  case $opt in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --name|-n) NAME=$val ;;
    --zone|-z) ZONE_=$val ;;
    --project) PROJECT_=$val ;;
    --accelerator-type) ACCEL=$val ;;
    --version|--runtime-version) VERSION=$val ;;
    --spot|--preemptible)
      [[ -z $CAPACITY || $CAPACITY == "$opt" ]] || die_usage "--spot and --preemptible are exclusive"
      CAPACITY=$opt ;;
    --repo-url) REPO_URL_=$val ;;
    --branch) BRANCH_=$val ;;
    --remote-dir) REMOTE_DIR_=$val ;;
    --config) CONFIG_=$val ;;
    --workdir) WORKDIR_=$val ;;
    --data-dir) DATA_DIR_=$val ;;
    --python) PYTHON_=$val ;;
    --worker) WORKER=$val ;;
    --lines) LINES=$val ;;
    --grace) GRACE=$val ;;
    --follow|-f) FOLLOW=1 ;;
    --yes|-y) YES=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) die_usage "unknown option $opt" ;;
    *)
      [[ -z $COMMAND ]] || die_usage "unexpected argument '$opt' (command is already '$COMMAND')"
      COMMAND=$opt ;;
  esac
  shift
done

[[ -n $COMMAND ]] || die_usage "missing COMMAND (create, setup, run, logs, stop or delete)"
case $COMMAND in
  create|setup|run|logs|stop|delete) ;;
  *) die_usage "unknown command '$COMMAND'" ;;
esac
[[ -n $NAME ]] || die_usage "$COMMAND needs --name (or TPU_NAME)"
[[ -n $ZONE_ ]] || die_usage "$COMMAND needs --zone (or ZONE)"
[[ $WORKER =~ ^[0-9]+$ ]] || die_usage "--worker must be a worker number, got '$WORKER'"
[[ $LINES =~ ^[0-9]+$ ]] || die_usage "--lines must be a number, got '$LINES'"
[[ $GRACE =~ ^[0-9]+$ ]] || die_usage "--grace must be a number of seconds, got '$GRACE'"
if (( ${#EXTRA[@]} )) && [[ $COMMAND != run ]]; then
  die_usage "arguments after -- are only for 'run'"
fi

LOG_DIR='$HOME/debiformer-logs'
LOG_FILE="$LOG_DIR/train-\$(hostname).log"

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE_")
[[ -n $PROJECT_ ]] && COMMON+=(--project="$PROJECT_")

ssh_workers() {  # worker, remote command
  run_cmd "${GCLOUD_TPU[@]}" ssh "$NAME" "${COMMON[@]}" --worker="$1" --command="$2"
}

# ----------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------
case $COMMAND in
  create)
    [[ -n $ACCEL ]] || die_usage "create needs --accelerator-type (or ACCELERATOR_TYPE), e.g. v4-32"
    [[ -n $VERSION ]] || die_usage "create needs --version (or RUNTIME_VERSION)"
    cmd=("${GCLOUD_TPU[@]}" create "$NAME" "${COMMON[@]}"
         --accelerator-type="$ACCEL" --version="$VERSION")
    [[ -n $CAPACITY ]] && cmd+=("$CAPACITY")
    run_cmd "${cmd[@]}"
    ;;

  setup)
    remote_dir=$(q "$REMOTE_DIR_")
    install="cd $remote_dir && $(q "$PYTHON_") -m pip install -U pip && $(q "$PYTHON_") -m pip install -r requirements.txt \"jax[tpu]\""
    if [[ -n $REPO_URL_ ]]; then
      branch_opt=""
      [[ -n $BRANCH_ ]] && branch_opt=" --branch $(q "$BRANCH_")"
      fetch="if [ -d $remote_dir/.git ]; then git -C $remote_dir pull --ff-only; else git clone$branch_opt $(q "$REPO_URL_") $remote_dir; fi"
      ssh_workers all "$fetch && $install"
    else
      [[ -z $BRANCH_ ]] || die_usage "--branch needs --repo-url"
      tarball=/tmp/debiformer-jax-src.tar.gz
      run_cmd tar -C "$REPO_ROOT" --exclude=./.git --exclude=__pycache__ \
        --exclude=.pytest_cache --exclude='./workdir*' --exclude=./runs \
        --exclude=./out --exclude=./.venv -czf "$tarball" .
      run_cmd "${GCLOUD_TPU[@]}" scp "$tarball" "$NAME:$tarball" "${COMMON[@]}" --worker=all
      ssh_workers all "mkdir -p $remote_dir && tar -xzf $tarball -C $remote_dir && $install"
    fi
    ;;

  run)
    [[ -n $WORKDIR_ ]] || die_usage "run needs --workdir (or WORKDIR), e.g. gs://my-bucket/runs/small"
    if [[ $WORKDIR_ != gs://* ]]; then
      echo "$PROG: warning: --workdir $WORKDIR_ is not on GCS; on a pod every worker" \
           "must see the same checkpoint directory." >&2
    fi
    main=("$PYTHON_" -m debiformer_jax.main --config="$CONFIG_" --workdir="$WORKDIR_")
    [[ -n $DATA_DIR_ ]] && main+=(--config.data.data_dir="$DATA_DIR_")
    main+=("${EXTRA[@]}")
    ssh_workers all "cd $(q "$REMOTE_DIR_") && mkdir -p $LOG_DIR && nohup $(join_quoted "${main[@]}") > $LOG_FILE 2>&1 < /dev/null &"
    ;;

  logs)
    follow=""
    (( FOLLOW )) && follow=" -F"
    ssh_workers "$WORKER" "tail -n $LINES$follow $LOG_FILE"
    ;;

  stop)
    pat='"[d]ebiformer_jax[.]main"'
    ssh_workers all "pkill -TERM -f $pat || exit 0; for i in \$(seq $GRACE); do pgrep -f $pat > /dev/null || exit 0; sleep 1; done; pkill -KILL -f $pat; true"
    ;;

  delete)
    cmd=("${GCLOUD_TPU[@]}" delete "$NAME" "${COMMON[@]}")
    (( YES )) && cmd+=(--quiet)
    run_cmd "${cmd[@]}"
    ;;
esac
