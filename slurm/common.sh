# shellcheck shell=bash
# Shared logic of the slurm/*.sbatch scripts; sourced, never run. See slurm/README.md.
#
# A script calls, in this order:
#   tkd_setup "$@"      RECIPE [tail-kd train args...] [--dry-run]: activate the venv, parse the
#                       arguments, choose the device, set the rendezvous (MASTER_ADDR/PORT), the
#                       output dir and --resume; fills the array TKD_TRAIN_ARGS (recipe first)
#   tkd_launch CMD...   print the command, run it (unless dry run), pass a preemption signal on to
#                       the ranks, and requeue the job if the trainer stopped early; exits
#
# Settings (environment variables; sbatch passes your shell's environment to the job):
#   TAIL_KD_VENV        virtualenv to activate (default: the repository's .venv; "none": keep the
#                       current environment, e.g. a conda env activated before sbatch)
#   TAIL_KD_DEVICE      auto (default: the recipe's `device`) | cuda | cpu. cpu runs on CPU cores
#                       with gloo (DS_ACCELERATOR=cpu, --set device=cpu): tests and laptops
#   TAIL_KD_RUNS_DIR    where output dirs are made (default: runs, relative to the job's working
#                       directory); ignored when the arguments give --output-dir
#   TAIL_KD_DRY_RUN=1   print the resolved command and exit (same as --dry-run)
#   TAIL_KD_SRUN_ARGS   extra srun options, e.g. "--cpu-bind=cores"
#
# Exit status of the job: 0 finished (DONE written); 0 after a successful requeue (the job runs
# again); the trainer's status otherwise (tail_kd/exit_status.py: 1 error, 2 bad input, 75
# stopped early and the requeue failed).
#
# The trainer's contract is asked of the package, never written again here:
#   python -m tail_kd.exit_status                 TKD_EXIT_USAGE, TKD_EXIT_PREEMPTED, ...
#   python -m tail_kd.cli status RUN_DIR --shell  TKD_RUN_STATE (new | in progress | finished)
#                                                 TKD_RUN_STEP (newest complete checkpoint, 0 if none)
#                                                 and TKD_RUN_NEWEST ("step N" or "none")
#   python -m tail_kd.rendezvous                  MASTER_ADDR, MASTER_PORT of the job

tkd_log() { echo "[tail-kd $(date '+%F %T')] $*"; }
# Until the package's statuses are loaded (no venv yet), an error is a plain failure (1).
tkd_die() { echo "[tail-kd] error: $*" >&2; exit "${TKD_EXIT_USAGE:-1}"; }

# Run the package's `python -m MODULE ARGS...` and evaluate the NAME=value lines it prints.
tkd_ask() {
  local lines
  lines=$(python -m "$@") || tkd_die "\`python -m $*\` failed: is tail-kd installed for $(command -v python)? (TAIL_KD_VENV)"
  eval "$lines"
}

# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

# TKD_RECIPE and TKD_TRAIN_ARGS (train options without the recipe and --dry-run).
tkd_parse_args() {
  TKD_TRAIN_ARGS=()
  local arg
  for arg in "$@"; do
    [ "$arg" = --dry-run ] || TKD_TRAIN_ARGS+=("$arg")
  done
  if [ "${#TKD_TRAIN_ARGS[@]}" = 0 ] || [[ ${TKD_TRAIN_ARGS[0]} == -* ]]; then
    tkd_die "usage: sbatch slurm/<script>.sbatch RECIPE.yaml [tail-kd train args...] [--dry-run]"
  fi
  TKD_RECIPE=${TKD_TRAIN_ARGS[0]}
  TKD_TRAIN_ARGS=("${TKD_TRAIN_ARGS[@]:1}")
  [ -f "$TKD_RECIPE" ] || tkd_die "recipe not found: $TKD_RECIPE (relative to $PWD)"
}

# True if the train arguments contain the option $1 (as `--opt` or `--opt=...`).
tkd_has_arg() {
  local arg
  for arg in "${TKD_TRAIN_ARGS[@]}"; do
    if [ "$arg" = "$1" ] || [[ $arg == "$1"=* ]]; then return 0; fi
  done
  return 1
}

# The value of option $1 in the train arguments (`--opt V` or `--opt=V`); empty if absent.
tkd_arg_value() {
  local i args=("${TKD_TRAIN_ARGS[@]}")
  for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
      "$1") echo "${args[i + 1]:-}"; return ;;
      "$1"=*) echo "${args[i]#*=}"; return ;;
    esac
  done
}

# The value given by `--set KEY=VALUE` for KEY $1 (the last one wins); empty if absent.
tkd_set_value() {
  local i value="" args=("${TKD_TRAIN_ARGS[@]}")
  for ((i = 0; i < ${#args[@]}; i++)); do
    if [ "${args[i]}" = --set ] && [[ ${args[i + 1]:-} == "$1"=* ]]; then
      value=${args[i + 1]#*=}
    elif [[ ${args[i]} == --set="$1"=* ]]; then
      value=${args[i]#--set="$1"=}
    fi
  done
  echo "$value"
}

# ---------------------------------------------------------------------------------------------
# Environment: venv, device, threads, rendezvous
# ---------------------------------------------------------------------------------------------

tkd_activate_venv() {
  local venv=${TAIL_KD_VENV-$TAIL_KD_REPO/.venv}
  if [ -z "$venv" ] || [ "$venv" = none ]; then
    tkd_log "python: $(command -v python || echo none) (TAIL_KD_VENV=none: environment kept)"
    return
  fi
  if [ ! -f "$venv/bin/activate" ]; then
    [ "$TKD_DRY_RUN" = 1 ] && { tkd_log "(dry run) no venv at $venv"; return; }
    tkd_die "no virtualenv at $venv: create it (tools/setup_env.sh) or set TAIL_KD_VENV"
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  tkd_log "python: $(command -v python)"
}

# CPU mode (gloo, DeepSpeed's CPU accelerator) or an explicit cuda; auto leaves the recipe's.
tkd_device() {
  case ${TAIL_KD_DEVICE:-auto} in
    auto) ;;
    cpu)
      export DS_ACCELERATOR=cpu
      TKD_TRAIN_ARGS+=(--set device=cpu) ;;
    cuda) TKD_TRAIN_ARGS+=(--set device=cuda) ;;
    *) tkd_die "TAIL_KD_DEVICE must be auto, cuda or cpu, got '$TAIL_KD_DEVICE'" ;;
  esac
}

# `tail-kd prepare-data RECIPE --check` (with the job's --set flags) checks the recipe and asks
# whether everything the ranks would download or build is in the caches already. If so, the job
# runs offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1; unless you set them): compute nodes often
# have no network, and every rank of every node downloading the teacher is slow where they do.
# If not, it says so and runs online. A recipe the check refuses fails the job here (status 2).
tkd_offline_if_prepared() {
  local sets=() i args=("${TKD_TRAIN_ARGS[@]}") status=0 report
  for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
      --set) sets+=(--set "${args[i + 1]:-}"); i=$((i + 1)) ;;
      --set=*) sets+=("${args[i]}") ;;
    esac
  done
  report=$(python -m tail_kd.cli prepare-data "$TKD_RECIPE" "${sets[@]}" --check 2>&1) || status=$?
  if [ "$status" = "$TKD_EXIT_USAGE" ]; then
    echo "$report" >&2
    tkd_die "the recipe cannot be used (above)"
  elif [ "$status" = 0 ]; then
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
    tkd_log "caches ready (tail-kd prepare-data --check): running offline"
  else
    tkd_log "warning: the caches are not ready, the ranks will download or build what is" \
            "missing (compute nodes need the network for it); run \`tail-kd prepare-data" \
            "$TKD_RECIPE ${sets[*]}\` on a login node first:"
    echo "$report"
  fi
}

# One OpenMP/MKL thread pool per rank sized to its CPUs (DeepSpeed's CPU Adam uses it with
# optimizer offload). srun of Slurm 22.05-23.02 does not inherit --cpus-per-task: pass it on.
tkd_threads() {
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
    export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
  fi
}

# MASTER_ADDR/MASTER_PORT for torch.distributed, the same on every node without talking
# (tail_kd/rendezvous.py). Set TAIL_KD_MASTER_ADDR / TAIL_KD_MASTER_PORT before sbatch to choose;
# a MASTER_ADDR inherited from the submitting shell is ignored (with a line in the log).
tkd_rendezvous() {
  tkd_ask tail_kd.rendezvous
  export MASTER_ADDR MASTER_PORT
}

# ---------------------------------------------------------------------------------------------
# Output dir and resuming
# ---------------------------------------------------------------------------------------------

# The run's name: the recipe file's name, prefixed by its folder unless that is recipes/
# (recipes/tiny/tad.yaml -> tiny-tad, recipes/quickstart.yaml -> quickstart).
tkd_recipe_name() {
  local stem folder
  stem=$(basename "${TKD_RECIPE%.*}")
  folder=$(basename "$(dirname "$TKD_RECIPE")")
  case $folder in recipes | . | /) echo "$stem" ;; *) echo "$folder-$stem" ;; esac
}

# TKD_OUTPUT_DIR: --output-dir (or --set output_dir=) when given, else
# $TAIL_KD_RUNS_DIR/<recipe name>-<job id>: the same for every run of one job (requeues keep the
# job id), new for each submission. TensorBoard writes to <output dir>/tensorboard/<run_name>
# (unless the recipe sets log.tensorboard_dir), so `tensorboard --logdir runs` shows every job.
tkd_output_dir() {
  TKD_OUTPUT_DIR=$(tkd_arg_value --output-dir)
  [ -n "$TKD_OUTPUT_DIR" ] || TKD_OUTPUT_DIR=$(tkd_set_value output_dir)
  TKD_OUTPUT_DIR_GIVEN=1
  if [ -z "$TKD_OUTPUT_DIR" ]; then
    TKD_OUTPUT_DIR_GIVEN=0
    local job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
    job=${job:-${SLURM_JOB_ID:-local}}
    TKD_OUTPUT_DIR=${TAIL_KD_RUNS_DIR:-runs}/$(tkd_recipe_name)-$job
    TKD_TRAIN_ARGS+=(--output-dir "$TKD_OUTPUT_DIR")
  fi
}

# Adds --resume (unless the arguments say --resume or --overwrite) when --output-dir names a
# directory that holds a run (`tail-kd status`): a new job continuing that run. A fresh job's own
# output dir (<recipe>-<job id>) is never resumed: a run there belongs to an older job with the
# same id (after a cluster reset), and the trainer refuses the directory. A requeued run of this
# job resumes by itself, --overwrite or not: the trainer reads SLURM_RESTART_COUNT.
tkd_resume_args() {
  tkd_ask tail_kd.cli status "$TKD_OUTPUT_DIR" --shell
  TKD_START_STEP=$TKD_RUN_STEP
  if tkd_has_arg --resume || tkd_has_arg --overwrite; then return; fi
  if [ "$TKD_OUTPUT_DIR_GIVEN" = 1 ] && [ "$TKD_RUN_STATE" != new ]; then
    TKD_TRAIN_ARGS+=(--resume)
  fi
}

# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------

tkd_setup() {
  trap tkd_on_usr1 USR1  # from the start: a signal during set-up must not kill the batch shell
  trap tkd_on_term TERM
  tkd_log "job ${SLURM_JOB_ID:-(not in Slurm)}, restart ${SLURM_RESTART_COUNT:-0}," \
          "nodes ${SLURM_JOB_NODELIST:-$(hostname -s)}, working directory $PWD"
  TKD_DRY_RUN=${TAIL_KD_DRY_RUN:-0}
  case " $* " in *" --dry-run "*) TKD_DRY_RUN=1 ;; esac
  tkd_activate_venv
  tkd_ask tail_kd.exit_status
  tkd_parse_args "$@"
  tkd_device
  tkd_offline_if_prepared
  tkd_threads
  tkd_rendezvous
  tkd_output_dir
  tkd_resume_args
  TKD_TRAIN_ARGS=("$TKD_RECIPE" "${TKD_TRAIN_ARGS[@]}")
  tkd_log "rendezvous $MASTER_ADDR:$MASTER_PORT; output dir $TKD_OUTPUT_DIR" \
          "(newest complete checkpoint: $TKD_RUN_NEWEST)"
  tkd_log "TensorBoard: tensorboard --logdir $(dirname "$TKD_OUTPUT_DIR")"
}

# A hostfile for the DeepSpeed launcher: every node of the job with $1 slots; prints its path.
tkd_hostfile() {
  local file node
  file=$(mktemp "${TMPDIR:-/tmp}/tail-kd-hostfile.XXXXXX")
  for node in $(if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
                  scontrol show hostnames "$SLURM_JOB_NODELIST"; else hostname -s; fi); do
    echo "$node slots=$1" >> "$file"
  done
  echo "$file"
}

# ---------------------------------------------------------------------------------------------
# Launch, preemption, requeue
# ---------------------------------------------------------------------------------------------
#
# Preemption protocol. `#SBATCH --signal=B:USR1@GRACE` makes Slurm send USR1 to this batch shell
# GRACE seconds before the time limit; `scancel --signal=USR1 --batch JOBID` does it by hand. The
# shell passes it on once to the training ranks (all job steps, via `scancel --signal=USR1`),
# each of which finishes its step, writes a complete checkpoint and exits with 75. The shell
# then requeues the job (`scontrol requeue`); the next run of the same job id finds the
# checkpoint in the same output dir and resumes; TensorBoard continues in the same run folder.
#
# SIGTERM is not passed on: when Slurm sends it (scancel, time limit, preemption) it sends it to
# the job steps too, and a rank that gets the signal twice stops at once without a checkpoint.
# Nor does a SIGTERM lead to a requeue: the job is being cancelled (scancel), has run out of time
# (TIMEOUT), or is being preempted (Slurm requeues it itself if the partition says so).

TKD_SIGNALLED=""    # USR1 once passed on to the ranks
TKD_TERMINATED=""   # 1 once this shell got SIGTERM
TKD_PID=""

# The srun processes of the launch ($TKD_PID itself, or its children for the DeepSpeed launcher).
tkd_srun_pids() {
  [ -n "$TKD_PID" ] || return 0
  [ "$(ps -o comm= -p "$TKD_PID" 2>/dev/null)" = srun ] && echo "$TKD_PID"
  pgrep -x srun -P "$TKD_PID" || true
}

tkd_on_usr1() {
  if [ -n "$TKD_SIGNALLED" ]; then
    tkd_log "SIGUSR1 again: already passed on, ignored"
    return
  fi
  TKD_SIGNALLED=USR1
  tkd_log "SIGUSR1 (preemption / time limit ahead): asking the ranks to checkpoint and stop"
  if [ -z "$TKD_PID" ]; then return; fi  # not launched yet: tkd_launch will not launch
  if ! scancel --signal=USR1 "$SLURM_JOB_ID"; then  # every step of the job, not this shell
    tkd_log "scancel failed; signalling srun directly"
    local pid
    for pid in $(tkd_srun_pids); do kill -s USR1 "$pid" || true; done
  fi
}

tkd_on_term() {
  if [ -n "$TKD_REQUEUE_STEP" ]; then  # `scontrol requeue` succeeded: Slurm ends this run
    tkd_requeued "$TKD_REQUEUE_STEP"
  fi
  TKD_TERMINATED=1
  tkd_log "SIGTERM: the job is being cancelled, preempted or out of time (the ranks got it too);" \
          "it will not be requeued from here"
}

# Slurm may SIGTERM this shell before `scontrol requeue` returns: TKD_REQUEUE_STEP tells the
# TERM trap that the requeue is under way, so the job log still says what happened.
TKD_REQUEUE_STEP=""
tkd_requeue() {
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    TKD_REQUEUE_STEP=$1
    if scontrol requeue "$SLURM_JOB_ID"; then tkd_requeued "$1"; fi
    TKD_REQUEUE_STEP=""
  fi
  tkd_log "could not requeue (not in Slurm, or submitted with --no-requeue?); resume with:" \
          "sbatch ... ${TKD_TRAIN_ARGS[0]} --output-dir $TKD_OUTPUT_DIR"
  exit "$TKD_EXIT_PREEMPTED"
}

tkd_requeued() {
  tkd_log "requeued job $SLURM_JOB_ID: its next run resumes from step $1 in $TKD_OUTPUT_DIR"
  exit 0
}

# Run the command "$@" (the ranks), then finish the job: exit 0 when the run is DONE, requeue it
# when it stopped early with a checkpoint, else exit with its status.
tkd_launch() {
  tkd_log "launch: $(printf '%q ' "$@")"
  if [ "$TKD_DRY_RUN" = 1 ]; then
    tkd_log "(dry run: not started)"
    exit 0
  fi
  if [ -n "$TKD_SIGNALLED$TKD_TERMINATED" ]; then  # signalled during set-up: nothing to save
    [ -n "$TKD_TERMINATED" ] || tkd_requeue "$TKD_START_STEP"
    exit "$TKD_EXIT_PREEMPTED"
  fi
  "$@" &
  TKD_PID=$!
  local status
  while :; do
    # `wait` returns early (status > 128) when a trapped signal arrives; wait again until the
    # launch itself has ended (bash keeps its status for the final `wait`).
    wait "$TKD_PID" && status=0 || status=$?
    kill -0 "$TKD_PID" 2>/dev/null || break
  done
  wait "$TKD_PID" && status=0 || status=$?
  TKD_PID=""  # the traps stay: a late USR1 is only logged, a late TERM still vetoes a requeue
  tkd_finish "$status"
}

tkd_finish() {
  local status=$1 step
  tkd_ask tail_kd.cli status "$TKD_OUTPUT_DIR" --shell
  step=$TKD_RUN_STEP
  if [ "$TKD_RUN_STATE" = finished ]; then
    # DONE is written after the last step's checkpoint; a rank that aborts at interpreter exit
    # afterwards (rare, seen with gloo) does not undo a finished run.
    [ "$status" = 0 ] || tkd_log "warning: the launch exited with $status after the run finished"
    tkd_log "finished at step $step: $TKD_OUTPUT_DIR" \
            "(export: tail-kd export $TKD_OUTPUT_DIR $TKD_OUTPUT_DIR/hf)"
    # The recipe's benchmarks (eval.tasks), if it names any: one process, on this node.
    python -m tail_kd.cli eval "$TKD_OUTPUT_DIR" --final || {
      status=$?
      tkd_log "the benchmarks failed (status $status); the trained run is kept: rerun" \
              "\`tail-kd eval $TKD_OUTPUT_DIR --final\`"
      exit "$status"
    }
    exit 0
  fi
  # Requeue when the trainer says it stopped early (75), or when USR1 was passed on and the run
  # did not fail on its input (2): the job is about to lose its allocation anyway, and the next
  # run continues from the newest complete checkpoint (step 0 if the signal came early). (With
  # srun --kill-on-bad-exit the status may be srun's 143 rather than 75: the first rank to exit
  # with 75 ends the others, all of which had already written the checkpoint.) Never after a
  # SIGTERM to this shell, which means scancel, a time-out or Slurm's own preemption.
  if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "$TKD_TERMINATED" ] &&
     { [ "$status" = "$TKD_EXIT_PREEMPTED" ] ||
       { [ -n "$TKD_SIGNALLED" ] && [ "$status" != "$TKD_EXIT_USAGE" ]; }; }; then
    tkd_log "stopped early (status $status); newest complete checkpoint: $TKD_RUN_NEWEST"
    tkd_requeue "$step"
  fi
  tkd_log "the launch exited with status $status (newest complete checkpoint: $TKD_RUN_NEWEST)"
  exit "$status"
}
