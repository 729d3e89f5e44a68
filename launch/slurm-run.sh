# Sourced by the sbatch scripts in launch/ (not run on its own): start one jaxlm process per
# Slurm task and requeue the job when training stopped early on request.
#
# Every task runs `python -m jaxlm.train "$@"`; jax.distributed finds the others from Slurm's
# variables. --kill-on-bad-exit ends every task when one fails, instead of leaving the rest
# waiting in a collective. When training exits with code 75 (SIGTERM from preemption, SIGUSR1
# from `#SBATCH --signal=USR1@120` before the time limit, or train.time_limit), the checkpoint
# of the step it finished is complete: the job is requeued, runs this same command again and
# resumes from that checkpoint.
#
# When training exits with code 76, a task's step watchdog found it stuck (jaxlm/watchdog.py).
# The tasks that fell behind name their hosts; the job is requeued held, a one-task helper job
# adds those hosts to its excluded nodes (Slurm changes that only for a pending job) and
# releases it, and the job resumes from its last checkpoint elsewhere. A hang with no host
# behind it is requeued as it is: nodes are excluded only on the watchdog's evidence.
#
# With JAXLM_DOCTOR set, every start of the job (requeues too) first runs the preflight checks
# of `python -m jaxlm.doctor` on every task, with $JAXLM_DOCTOR as its arguments ("1": none;
# e.g. "--mesh tp=4,dp=-1" to measure the training mesh's axes). When it names outlier hosts
# (exit 77) the job is requeued without them, as after a hang, before training starts; any
# other failure of the checks ends the job with their exit code.

PYTHON=${JAXLM_PYTHON:-python3}
echo "jaxlm: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES} node(s), ${SLURM_NTASKS} task(s): $*"

# A task that stops with a checkpoint creates this file (on the shared submit directory) before
# it exits 75; srun may then report the signal of the peers it killed instead of 75.
export JAXLM_STOP_MARKER="${SLURM_SUBMIT_DIR:-.}/.jaxlm-stopped-${SLURM_JOB_ID}"
rm -f "$JAXLM_STOP_MARKER"  # a requeued job keeps its id
export JAXLM_HANG_MARKER="${SLURM_SUBMIT_DIR:-.}/.jaxlm-hung-${SLURM_JOB_ID}"
rm -f "$JAXLM_HANG_MARKER"

# requeue_without HOSTS WHY: requeue this job held; a one-task helper job adds HOSTS to its
# excluded nodes (Slurm changes them only for a pending job) and releases it.
requeue_without() {
    local hosts=$1 why=$2 excluded
    excluded=$(scontrol show job -o "${SLURM_JOB_ID}" | sed -n 's/.*ExcNodeList=\([^ ]*\).*/\1/p')
    [ "$excluded" = "(null)" ] && excluded=""
    excluded="${excluded:+${excluded},}${hosts}"
    echo "jaxlm: ${why}; requeueing job ${SLURM_JOB_ID} without ${excluded}"
    sbatch --job-name="jaxlm-exclude-${SLURM_JOB_ID}" --ntasks=1 --output=/dev/null --wrap \
        "until scontrol show job -o ${SLURM_JOB_ID} | grep -q 'JobState=PENDING'; do sleep 1; done
         scontrol update JobId=${SLURM_JOB_ID} ExcNodeList=${excluded}
         scontrol release ${SLURM_JOB_ID}"
    scontrol requeuehold "${SLURM_JOB_ID}"
}

if [ -n "${JAXLM_DOCTOR:-}" ]; then
    report="${SLURM_SUBMIT_DIR:-.}/.jaxlm-doctor-${SLURM_JOB_ID}.json"
    doctor_args=${JAXLM_DOCTOR}
    [ "$doctor_args" = "1" ] && doctor_args=""
    # shellcheck disable=SC2086  # the arguments are meant to split
    srun --kill-on-bad-exit=1 "$PYTHON" -u -m jaxlm.doctor --json $doctor_args >"$report"
    status=$?
    echo "jaxlm: preflight result: $(cat "$report")"  # the evidence stays in the job's log
    [ "$status" -eq 77 ] && hosts=$("$PYTHON" -m jaxlm.doctor outliers "$report")
    rm -f "$report"
    if [ "$status" -eq 77 ]; then
        requeue_without "$hosts" "the preflight checks found ${hosts} markedly slower than the others"
        exit "$status"
    elif [ "$status" -ne 0 ]; then
        echo "jaxlm: the preflight checks failed with exit code ${status}; not training"
        exit "$status"
    fi
    echo "jaxlm: preflight checks passed"
fi

srun --kill-on-bad-exit=1 "$PYTHON" -u -m jaxlm.train "$@"
status=$?
if [ -e "$JAXLM_STOP_MARKER" ]; then
    status=75
    rm -f "$JAXLM_STOP_MARKER"
fi

if [ -e "$JAXLM_HANG_MARKER" ]; then
    status=76  # srun may report the signal of the peers it killed instead
    hosts=$("$PYTHON" -m jaxlm.watchdog culprits "$JAXLM_HANG_MARKER")
    rm -f "$JAXLM_HANG_MARKER"
fi

if [ "$status" -eq 75 ]; then
    echo "jaxlm: stopped early with a checkpoint; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
elif [ "$status" -eq 76 ] && [ -n "${hosts:-}" ]; then
    requeue_without "$hosts" "a task hung on ${hosts}"
elif [ "$status" -eq 76 ]; then
    echo "jaxlm: the job hung with no host behind it; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
fi
exit "$status"
