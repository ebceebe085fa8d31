#!/bin/bash
#SBATCH --array=0
#SBATCH --cpus-per-task=8
#SBATCH --export=ALL
#SBATCH --gres=gpu:a100:2
#SBATCH --job-name=taskcodec-train
#SBATCH --mail-type=END,FAIL
#SBATCH --mail-user=me@example.org
#SBATCH --mem=32G
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/scratch/me/logs/%x-%A_%a.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --time=1-00:00:00
#
# Rendered by slurm-launch: MLflow entry point 'train', 1 array task continuing one MLflow run.
# $TASKCODEC_RUN_IDS (set at submission, kept by Slurm across requeues) holds the run ids,
# so a requeued task continues its own run from its last checkpoint. Credentials are not
# written here: they come from the exported environment or $TASKCODEC_CREDENTIALS_FILE.
set -uo pipefail

task=${SLURM_ARRAY_TASK_ID:-0}
case $task in
  0) cmd=(mlflow run /opt/taskcodec -e train --env-manager local --experiment-name rd-a100 -P codec=mbt2018-mean -P lmbda=0.0067 -P precision=auto -P tf32=true) ;;
  *) echo "taskcodec: array task $task has no parameters in this script" >&2; exit 2 ;;
esac
read -r -a run_ids <<< "${TASKCODEC_RUN_IDS:-}"
run_id=${run_ids[$task]:-}
if [[ -n $run_id ]]; then cmd+=(--run-id "$run_id"); else
  echo "taskcodec: no MLflow run id for array task $task (submit with slurm-launch): mlflow creates a new run" >&2
fi

export MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true
export MLFLOW_EXPERIMENT_NAME=rd-a100
export MLFLOW_TRACKING_URI=http://mlflow.example.org:5000
export OMP_NUM_THREADS=4
export TASKCODEC_IMAGE=/project/images/taskcodec.sif
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_HOME=/tmp/torch
if [[ -n ${TASKCODEC_CREDENTIALS_FILE:-} ]]; then  # KEY=VALUE lines, mode 0600
  set -a; source "$TASKCODEC_CREDENTIALS_FILE" || exit 1; set +a
fi

# Set-up lines from the launch options, run as written:
module load apptainer

ckpt_root=/scratch/me/logs/checkpoints
[[ $ckpt_root == /* ]] || ckpt_root=$PWD/$ckpt_root
ckpt_dir=$ckpt_root/${run_id:-job-${SLURM_JOB_ID:-$$}}
mkdir -p "$ckpt_dir" || exit 1
cmd+=(-P "checkpoint_dir=$ckpt_dir")

# Copy the data set to node-local scratch once per job start.
stage_dir=${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/taskcodec-data-${SLURM_JOB_ID:-$$}
data_src=/project/data/clic.tar
mkdir -p "$stage_dir" && cp -a -- "$data_src" "$stage_dir/" || { echo "taskcodec: cannot copy $data_src to $stage_dir" >&2; exit 1; }
cmd+=(-P "data=$stage_dir/${data_src##*/}")

dist=(torchrun --standalone --nnodes=1 --nproc-per-node=2)
cmd=("${dist[@]}" --no-python sh -c 'trap "" USR1 TERM; exec "$@"' sh "${cmd[@]}")
pass_env=(AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN CUDA_VISIBLE_DEVICES HTTPS_PROXY HTTP_PROXY MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING MLFLOW_EXPERIMENT_NAME MLFLOW_S3_ENDPOINT_URL MLFLOW_TRACKING_CLIENT_CERT_PATH MLFLOW_TRACKING_INSECURE_TLS MLFLOW_TRACKING_PASSWORD MLFLOW_TRACKING_SERVER_CERT_PATH MLFLOW_TRACKING_TOKEN MLFLOW_TRACKING_URI MLFLOW_TRACKING_USERNAME NO_PROXY OMP_NUM_THREADS SLURM_ARRAY_JOB_ID SLURM_ARRAY_TASK_ID SLURM_CPUS_PER_TASK SLURM_JOB_ID SLURM_JOB_NAME SLURM_JOB_NODELIST SLURM_JOB_NUM_NODES SLURM_NODEID SLURM_PROCID SLURM_TMPDIR TASKCODEC_GIT_COMMIT TASKCODEC_IMAGE TORCHELASTIC_SIGNALS_TO_HANDLE TORCH_HOME WANDB_MODE http_proxy https_proxy no_proxy)
runtime=apptainer; command -v apptainer >/dev/null || runtime=singularity
for name in "${pass_env[@]}"; do  # --cleanenv: only these get in (values not rendered)
  [[ -n ${!name+set} ]] && export "APPTAINERENV_$name=${!name}" "SINGULARITYENV_$name=${!name}"
done
binds=()
for path in "$ckpt_dir" "$stage_dir" ${SLURM_TMPDIR:-} /project/data; do binds+=(--bind "$path"); done
cmd=("$runtime" exec --nv --cleanenv "${binds[@]}" /project/images/taskcodec.sif sh -c 'trap "" USR1 TERM; "$@" & c=$!; f() { trap "" "$1"; kill -s "$1" 0 2>/dev/null; }; trap "f USR1" USR1; trap "f TERM" TERM; while :; do wait "$c"; s=$?; kill -0 "$c" 2>/dev/null || break; done; wait "$c" 2>/dev/null; l=$?; [ "$l" != 127 ] && s=$l; exit "$s"' relay "${cmd[@]}")

# Forward SIGUSR1 (time limit near) and SIGTERM (cancel, requeue, preemption) once to the
# process group; the training process checkpoints and exits 75, the wrappers ignore both.
requeue=0
forward() { trap "" "$1"; kill -s "$1" 0 2>/dev/null; echo "taskcodec: SIG$1 forwarded" >&2; }
trap 'requeue=1; forward USR1' USR1
trap 'forward TERM' TERM
printf "taskcodec: job %s task %s run %s on %s:" "${SLURM_JOB_ID:-}" "$task" "${run_id:-new}" "$(hostname)" >&2; printf " %q" "${cmd[@]}" >&2; echo >&2
"${cmd[@]}" &
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
