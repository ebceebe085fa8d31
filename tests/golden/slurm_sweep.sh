#!/bin/bash
#SBATCH --array=0-3%2
#SBATCH --cpus-per-task=2
#SBATCH --dependency=afterok:1234
#SBATCH --export=ALL
#SBATCH --gres=gpu:1
#SBATCH --job-name=taskcodec-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/scratch/me/logs/%x-%A_%a.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --time=12:00:00
#
# Rendered by slurm-launch: MLflow entry point 'train', 4 array tasks, each continuing its own MLflow run.
# $TASKCODEC_RUN_IDS (set at submission, kept by Slurm across requeues) holds the run ids,
# so a requeued task continues its own run from its last checkpoint. Credentials are not
# written here: they come from the exported environment or $TASKCODEC_CREDENTIALS_FILE.
set -uo pipefail

task=${SLURM_ARRAY_TASK_ID:-0}
case $task in
  0) cmd=(mlflow run /home/me/taskcodec -e train --env-manager local --experiment-name rd-sweep -P codec=bmshj2018-factorized -P epochs=100 -P lmbda=0.0018 -P precision=auto -P tf32=true) ;;
  1) cmd=(mlflow run /home/me/taskcodec -e train --env-manager local --experiment-name rd-sweep -P codec=bmshj2018-factorized -P epochs=100 -P lmbda=0.0067 -P precision=auto -P tf32=true) ;;
  2) cmd=(mlflow run /home/me/taskcodec -e train --env-manager local --experiment-name rd-sweep -P codec=mbt2018-mean -P epochs=100 -P lmbda=0.0018 -P precision=auto -P tf32=true) ;;
  3) cmd=(mlflow run /home/me/taskcodec -e train --env-manager local --experiment-name rd-sweep -P codec=mbt2018-mean -P epochs=100 -P lmbda=0.0067 -P precision=auto -P tf32=true) ;;
  *) echo "taskcodec: array task $task has no parameters in this script" >&2; exit 2 ;;
esac
read -r -a run_ids <<< "${TASKCODEC_RUN_IDS:-}"
run_id=${run_ids[$task]:-}
if [[ -n $run_id ]]; then cmd+=(--run-id "$run_id"); else
  echo "taskcodec: no MLflow run id for array task $task (submit with slurm-launch): mlflow creates a new run" >&2
fi

export MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true
export MLFLOW_EXPERIMENT_NAME=rd-sweep
export MLFLOW_TRACKING_URI=http://mlflow.example.org:5000
export OMP_NUM_THREADS=2
if [[ -n ${TASKCODEC_CREDENTIALS_FILE:-} ]]; then  # KEY=VALUE lines, mode 0600
  set -a; source "$TASKCODEC_CREDENTIALS_FILE" || exit 1; set +a
fi

source /home/me/.venv/bin/activate || exit 1

ckpt_root=/scratch/me/logs/checkpoints
[[ $ckpt_root == /* ]] || ckpt_root=$PWD/$ckpt_root
ckpt_dir=$ckpt_root/${run_id:-job-${SLURM_JOB_ID:-$$}}
mkdir -p "$ckpt_dir" || exit 1
cmd+=(-P "checkpoint_dir=$ckpt_dir")

# Forward SIGUSR1 (time limit near) and SIGTERM (cancel, requeue, preemption) once to the
# process group; the training process checkpoints and exits 75, the wrappers ignore both.
requeue=0
forward() { trap "" "$1"; kill -s "$1" 0 2>/dev/null; echo "taskcodec: SIG$1 forwarded" >&2; }
trap 'requeue=1; forward USR1' USR1
trap 'forward TERM' TERM
printf "taskcodec: job %s task %s run %s on %s:" "${SLURM_JOB_ID:-}" "$task" "${run_id:-new}" "$(hostname)" >&2; printf " %q" "${cmd[@]}" >&2; echo >&2
( trap '' USR1 TERM; exec "${cmd[@]}" ) &
child=$!
while :; do wait "$child"; status=$?; kill -0 "$child" 2>/dev/null || break; done
wait "$child" 2>/dev/null; last=$?; (( last != 127 )) && status=$last
if (( requeue && status != 0 )); then
  echo "taskcodec: time limit near: requeueing job $SLURM_JOB_ID to continue run ${run_id:-?}" >&2
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  echo "taskcodec: requeue refused: resubmitting array task $task" >&2
  sbatch --array="$task" "$0" && exit 0
fi
exit "$status"
