#!/usr/bin/env bash
# Submit launch/slurm_gpu.sbatch: multi-node GPU training, one task (one JAX
# process) per GPU. Run `launch/slurm_gpu.sh --help` for usage.
set -euo pipefail

PROG=$(basename "$0")
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SBATCH_SCRIPT="$REPO_ROOT/launch/slurm_gpu.sbatch"

usage() {
  cat <<EOF
Usage: $PROG [options] [-- extra main.py args]

Submits $SBATCH_SCRIPT with sbatch. Each node runs one task per GPU;
every task runs \`python -m debiformer_jax.main\`, and JAX's SLURM detection
wires them into one distributed job. The job runs in the repository root.

Options (environment variable in brackets)
  --workdir DIR          checkpoints + TensorBoard logs, on storage all nodes
                         see [WORKDIR]                                  (required)
  --config PATH          config file, default configs/small.py [CONFIG]
  --data-dir DIR         TFDS data_dir holding imagenet2012 [DATA_DIR]
  --nodes N              number of nodes, default 1 [NODES]
  --gpus-per-node G      GPUs (= tasks) per node, default 8 [GPUS_PER_NODE]
  --cpus-per-task C      CPU cores per task, default 8 [CPUS_PER_TASK]
  --time T               time limit, default 48:00:00 [TIME_LIMIT]
  --partition P          partition [PARTITION]
  --account A            account [ACCOUNT]
  --qos Q                QOS [QOS]
  --job-name NAME        default debiformer [JOB_NAME]
  --python PYTHON        python on the nodes (e.g. a venv's), default python [PYTHON]
  --requeue              let SLURM requeue the job after preemption/node failure
  --dry-run              print the sbatch command (and, as a '#' comment, the
                         srun command of the job step); run nothing
  -h, --help             this help

Anything after "--" is appended to the main.py command line
(e.g. -- --config.num_epochs=300).

Example
  $PROG --nodes 2 --gpus-per-node 8 --partition gpu --workdir /shared/runs/small \\
        --data-dir /shared/tensorflow_datasets
EOF
}

die_usage() {
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG --help' for usage." >&2
  exit 2
}

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
WORKDIR_=${WORKDIR:-}
CONFIG_=${CONFIG:-configs/small.py}
DATA_DIR_=${DATA_DIR:-}
NODES_=${NODES:-1}
GPUS_=${GPUS_PER_NODE:-8}
CPUS_=${CPUS_PER_TASK:-8}
TIME_=${TIME_LIMIT:-48:00:00}
PARTITION_=${PARTITION:-}
ACCOUNT_=${ACCOUNT:-}
QOS_=${QOS:-}
JOB_NAME_=${JOB_NAME:-debiformer}
PYTHON_=${PYTHON:-}
REQUEUE=0
EXTRA=()

while (( $# )); do
  opt=$1
  val=""
  has_inline=0
  if [[ $opt == --*=* ]]; then
    val=${opt#*=}
    opt=${opt%%=*}
    has_inline=1
  fi
  case $opt in
    --workdir|--config|--data-dir|--nodes|--gpus-per-node|--cpus-per-task|--time|\
    --partition|--account|--qos|--job-name|--python)
      if (( ! has_inline )); then
        (( $# >= 2 )) || die_usage "$opt needs a value"
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
    --workdir) WORKDIR_=$val ;;
    --config) CONFIG_=$val ;;
    --data-dir) DATA_DIR_=$val ;;
    --nodes) NODES_=$val ;;
    --gpus-per-node) GPUS_=$val ;;
    --cpus-per-task) CPUS_=$val ;;
    --time) TIME_=$val ;;
    --partition) PARTITION_=$val ;;
    --account) ACCOUNT_=$val ;;
    --qos) QOS_=$val ;;
    --job-name) JOB_NAME_=$val ;;
    --python) PYTHON_=$val ;;
    --requeue) REQUEUE=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die_usage "unknown argument $opt" ;;
  esac
  shift
done

[[ -n $WORKDIR_ ]] || die_usage "--workdir (or WORKDIR) is required"
for pair in "nodes:$NODES_" "gpus-per-node:$GPUS_" "cpus-per-task:$CPUS_"; do
  [[ ${pair#*:} =~ ^[1-9][0-9]*$ ]] || die_usage "--${pair%%:*} must be a positive integer, got '${pair#*:}'"
done
[[ $PYTHON_ != *,* ]] || die_usage "--python must not contain a comma"

sbatch_cmd=(sbatch
  --job-name="$JOB_NAME_"
  --nodes="$NODES_"
  --ntasks-per-node="$GPUS_"
  --gres=gpu:"$GPUS_"
  --cpus-per-task="$CPUS_"
  --time="$TIME_"
  --chdir="$REPO_ROOT")
if [[ -n $PARTITION_ ]]; then sbatch_cmd+=(--partition="$PARTITION_"); fi
if [[ -n $ACCOUNT_ ]]; then sbatch_cmd+=(--account="$ACCOUNT_"); fi
if [[ -n $QOS_ ]]; then sbatch_cmd+=(--qos="$QOS_"); fi
if (( REQUEUE )); then sbatch_cmd+=(--requeue); fi
if [[ -n $PYTHON_ ]]; then sbatch_cmd+=(--export=ALL,DEBIFORMER_PYTHON="$PYTHON_"); fi

main_args=(--config="$CONFIG_" --workdir="$WORKDIR_")
if [[ -n $DATA_DIR_ ]]; then main_args+=(--config.data.data_dir="$DATA_DIR_"); fi
main_args+=("${EXTRA[@]}")
sbatch_cmd+=("$SBATCH_SCRIPT" "${main_args[@]}")

if (( DRY_RUN )); then
  join_quoted "${sbatch_cmd[@]}"; echo
  step=$(env -u CONFIG -u WORKDIR -u DATA_DIR -u REPO_DIR -u SLURM_CPUS_PER_TASK \
           DEBIFORMER_PYTHON="${PYTHON_:-python}" SLURM_CPUS_PER_TASK="$CPUS_" \
           bash "$SBATCH_SCRIPT" --dry-run "${main_args[@]}")
  echo "# job step on each of the $NODES_ node(s), $GPUS_ task(s) per node: $step"
  exit 0
fi

echo "+ $(join_quoted "${sbatch_cmd[@]}")" >&2
"${sbatch_cmd[@]}"
