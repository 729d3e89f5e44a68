# Sourced by the sbatch scripts in launch/ (not run on its own): start one jaxlm process per
# Slurm task and requeue the job when training stopped early on request.
#
# Every task runs `python -m jaxlm.train "$@"`; jax.distributed finds the others from Slurm's
# variables. --kill-on-bad-exit ends every task when one fails, instead of leaving the rest
# waiting in a collective. When training exits with code 75 (SIGTERM from preemption, SIGUSR1
# from `#SBATCH --signal=USR1@120` before the time limit, or train.time_limit), the checkpoint
# of the step it finished is complete: the job is requeued, runs this same command again and
# resumes from that checkpoint.

PYTHON=${JAXLM_PYTHON:-python3}
echo "jaxlm: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES} node(s), ${SLURM_NTASKS} task(s): $*"

# A task that stops with a checkpoint creates this file (on the shared submit directory) before
# it exits 75; srun may then report the signal of the peers it killed instead of 75.
export JAXLM_STOP_MARKER="${SLURM_SUBMIT_DIR:-.}/.jaxlm-stopped-${SLURM_JOB_ID}"
rm -f "$JAXLM_STOP_MARKER"  # a requeued job keeps its id

srun --kill-on-bad-exit=1 "$PYTHON" -u -m jaxlm.train "$@"
status=$?
if [ -e "$JAXLM_STOP_MARKER" ]; then
    status=75
    rm -f "$JAXLM_STOP_MARKER"
fi

if [ "$status" -eq 75 ]; then
    echo "jaxlm: stopped early with a checkpoint; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
fi
exit "$status"
