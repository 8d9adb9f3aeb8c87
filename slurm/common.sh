# Shared launch logic for slurm/*.sbatch; sourced by them, never run on its own.
#
# Each .sbatch holds only its #SBATCH header and `dimsum_launch configs/<name>.yaml "$@"`. This file:
#   * starts one task per GPU with srun, each exporting RANK / LOCAL_RANK / WORLD_SIZE from SLURM_PROCID /
#     SLURM_LOCALID / SLURM_NTASKS and sharing MASTER_ADDR (first node's NodeAddr, which resolves even
#     where node names do not) and MASTER_PORT (derived from the job id, so a requeued job reuses it);
#   * forwards USR2/TERM from the batch shell (--signal=B:USR2@...) to the tasks through srun. The trainer
#     then saves collectively and exits 75 ("saved, please requeue"); we answer with `scontrol requeue`.
#
# Knobs (environment at submission time; sbatch exports it to the job):
#   DIMSUM_OVERRIDES     extra dotted overrides, space separated, placed before the command-line ones
#   DIMSUM_TRAIN_CMD     command that gets `<config.yaml> <overrides...>` (default: `dimsum train`)
#   DIMSUM_ROOT          repository root (default: the submission directory)
#   DIMSUM_LOG_DIR       task logs, one file per job and restart (default: $DIMSUM_ROOT/slurm/logs)
#   DIMSUM_MAX_REQUEUES  stop requeueing after this many restarts (default: 20)

DIMSUM_REQUEUE_EXIT_CODE=75  # launch.train.preemption.REQUEUE_EXIT_CODE

log() { echo "[dimsum $(date +%H:%M:%S)] $*"; }

# Must agree with launch.train.distributed.slurm_master_port (the submitit path and tests use that one).
dimsum_master_port() { echo $((20000 + SLURM_JOB_ID % 10000)); }

# The first allocated node's NodeAddr: on clusters it is the host name, on the local test cluster 127.0.0.1.
dimsum_master_addr() {
    local first addr
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    addr=$(scontrol show node -o "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
    echo "${addr:-$first}"
}

dimsum_launch() {
    local config=$1
    shift
    local root=${DIMSUM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$root" || { log "ERROR: DIMSUM_ROOT '$root' is not a directory"; return 2; }
    if [[ ! -f $config ]]; then
        log "ERROR: config '$config' not found under $root (submit from the repo root or set DIMSUM_ROOT)"
        return 2
    fi
    if [[ -z ${VIRTUAL_ENV:-} && -f .venv/bin/activate ]]; then
        # shellcheck disable=SC1091
        source .venv/bin/activate
    fi

    local -a train_cmd env_overrides
    read -r -a train_cmd <<<"${DIMSUM_TRAIN_CMD:-dimsum train}"
    read -r -a env_overrides <<<"${DIMSUM_OVERRIDES:-}"
    command -v "${train_cmd[0]}" >/dev/null || { log "ERROR: '${train_cmd[0]}' not found on PATH"; return 2; }

    export MASTER_ADDR MASTER_PORT
    MASTER_ADDR=$(dimsum_master_addr)
    MASTER_PORT=$(dimsum_master_port)
    # NCCL: warnings only; a rank whose peer died raises after the watchdog timeout instead of hanging.
    # Interconnect choices (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) are site specific: set them before sbatch.
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1

    local restart=${SLURM_RESTART_COUNT:-0}
    local log_dir=${DIMSUM_LOG_DIR:-$root/slurm/logs}
    local task_log=$log_dir/${SLURM_JOB_NAME}-${SLURM_JOB_ID}.restart${restart}.log
    # One task per GPU of the allocation as it is now: a requeued job may come back on another number of
    # nodes (scontrol update JobId=... NumNodes=...), and SLURM_NTASKS keeps the count of the submission.
    # The trainer then resumes through its world-size change path (README, "Resizing a run").
    local tasks=${SLURM_NTASKS:-1}
    if [[ -n ${SLURM_NTASKS_PER_NODE:-} && -n ${SLURM_JOB_NUM_NODES:-} ]]; then
        tasks=$((SLURM_JOB_NUM_NODES * SLURM_NTASKS_PER_NODE))
    fi
    mkdir -p "$log_dir"
    log "job $SLURM_JOB_ID restart $restart on $SLURM_JOB_NODELIST: $tasks task(s)," \
        "master $MASTER_ADDR:$MASTER_PORT, config $config, task log $task_log"

    # shellcheck disable=SC2016  # expanded by each task, not here
    local set_ranks='export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS'
    srun --ntasks="$tasks" --label --output="$task_log" bash -c "$set_ranks"'; exec "$@"' dimsum-task \
        "${train_cmd[@]}" "$config" "${env_overrides[@]}" "$@" &
    local srun_pid=$!
    # srun relays signals it receives to every task; USR2 is what the trainer listens for.
    trap 'log "signal received: forwarding USR2 to the tasks"; kill -USR2 '"$srun_pid"' 2>/dev/null' USR2 TERM
    while kill -0 "$srun_pid" 2>/dev/null; do
        wait "$srun_pid"  # returns early whenever a trapped signal arrives
    done
    wait "$srun_pid"  # bash keeps the status of a reaped child: this is srun's exit code
    local rc=$?
    trap - USR2 TERM

    if ((rc == DIMSUM_REQUEUE_EXIT_CODE)); then
        if ((restart >= ${DIMSUM_MAX_REQUEUES:-20})); then
            log "trainer asked for a requeue, but restart $restart reached DIMSUM_MAX_REQUEUES; stopping"
            return "$rc"
        fi
        log "trainer saved and asked for a requeue: scontrol requeue $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || { log "requeue refused (job cancelled?)"; return "$rc"; }
        return 0
    fi
    log "tasks exited with code $rc"
    return "$rc"
}
