#!/usr/bin/env bash
# End-to-end check: run the editscale workflow through a real (local, one-node) SLURM scheduler
# with profiles/slurm and snakemake-executor-plugin-slurm, then verify the jobs went through SLURM.
#
#   tests/slurm/run_workflow_on_slurm.sh [CONFIGFILE] [options] [-- extra snakemake args]
#
#   CONFIGFILE           workflow config, relative to the repo root    [config/test-tiny.yaml]
#   --smoke              run the two-job tests/slurm/smoke/Snakefile instead of the workflow
#   --timeout SECONDS    hard limit for snakemake (SIGKILL)   [$EDITSCALE_SLURM_TIMEOUT or 1800]
#   --keep-workdir       keep the temporary work directory even on PASS
#   --keep-cluster       leave the cluster running afterwards (also: KEEP_CLUSTER=1)
#   EDITSCALE_SLURM_WORKDIR=DIR  run in DIR (created; must not exist) and keep it: CI hands the
#                        finished tiny study to the report check, which then need not run it again
#
# Run as root on Debian 12 with the project venv active (or .venv present in the repo). It calls
# tests/slurm/setup_cluster.sh (see there for SLURM_TEST_DIR, EDITSCALE_SLURM_ACCOUNTING, ...),
# copies the repo (without .git, .venv, .snakemake, results; data/ as hard links) to a fresh
# temporary directory, runs there
#   snakemake --profile profiles/slurm --workflow-profile none --configfile CONFIGFILE --cores 2 \
#       --slurm-init-seconds-before-status-checks 2 --slurm-keep-successful-logs ...
# under `timeout -s KILL`, checks that
#   - snakemake exited 0 and its log says every step is done (100%), with no failed job,
#   - at least one job was submitted with sbatch ("submitted with SLURM jobid" in the log),
#   - every submitted SLURM job is COMPLETED in SLURM's records (sacct when accounting is on,
#     and the jobcomp text file in both modes) and has its log in .snakemake/slurm_logs/,
#   - (smoke) each output records the SLURM_JOB_ID it ran under,
# prints PASS/FAIL, and always stops the daemons it started (trap on EXIT). Exit 0 only on PASS.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CONFIG=config/test-tiny.yaml
SMOKE=0
TIMEOUT=${EDITSCALE_SLURM_TIMEOUT:-1800}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
EXTRA=()
while (($#)); do
    case $1 in
        --smoke) SMOKE=1 ;;
        --timeout) TIMEOUT=$2; shift ;;
        --timeout=*) TIMEOUT=${1#*=} ;;
        --keep-workdir) KEEP_WORKDIR=1 ;;
        --keep-cluster) KEEP_CLUSTER=1 ;;
        --configfile) CONFIG=$2; shift ;;
        --configfile=*) CONFIG=${1#*=} ;;
        -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        -*) echo "unknown option: $1 (snakemake options go after --)" >&2; exit 2 ;;
        *) CONFIG=$1 ;;
    esac
    shift
done

export SLURM_TEST_DIR=${SLURM_TEST_DIR:-/tmp/editscale-slurm}
ACCOUNTING=${EDITSCALE_SLURM_ACCOUNTING:-1}
export EDITSCALE_SLURM_ACCOUNTING=$ACCOUNTING
T0=$SECONDS
log() { printf '[run_workflow_on_slurm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- python env ------------------
if [[ -z ${VIRTUAL_ENV:-} && -f $REPO/.venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    . "$REPO/.venv/bin/activate"
fi
command -v snakemake >/dev/null || { log "FAIL: snakemake not on PATH (activate the project venv)"; exit 1; }

# ---------------------------------------------------------------- config ----------------------
if ((SMOKE)); then
    WHAT="smoke workflow (tests/slurm/smoke/Snakefile)"
else
    case $CONFIG in
        /*) CONFIG_ABS=$CONFIG ;;
        *) CONFIG_ABS=$REPO/$CONFIG ;;
    esac
    [[ -f $CONFIG_ABS ]] || { log "FAIL: config file not found: $CONFIG_ABS"; exit 1; }
    WHAT="workflow with $CONFIG"
fi

# ---------------------------------------------------------------- cluster ---------------------
pid_alive() { [[ -s $1 ]] && kill -0 "$(tr -dc '0-9' <"$1")" 2>/dev/null; }
STARTED_CLUSTER=0
WORK=""
RESULT=FAIL
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((STARTED_CLUSTER)) && [[ $KEEP_CLUSTER != 1 ]]; then
        "$HERE/teardown_cluster.sh" || true
    elif ((STARTED_CLUSTER)); then
        log "cluster left running (--keep-cluster); stop it with tests/slurm/teardown_cluster.sh"
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $RESULT == PASS && $KEEP_WORKDIR != 1 ]]; then
            rm -rf "$WORK"
        else
            log "work directory kept: $WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if pid_alive "$SLURM_TEST_DIR/run/slurmctld.pid"; then
    log "reusing the running test cluster in $SLURM_TEST_DIR (it will be left running)"
else
    STARTED_CLUSTER=1
fi
t_setup=$SECONDS
"$HERE/setup_cluster.sh" >&2 || { log "FAIL: cluster setup failed"; exit 1; }
SETUP_S=$((SECONDS - t_setup))
# shellcheck disable=SC1091
. "$SLURM_TEST_DIR/env.sh"
[[ $(cat "$SLURM_TEST_DIR/run/accounting" 2>/dev/null && echo 1 || echo 0) == 1 ]] && ACCOUNTING=1 || ACCOUNTING=0
STATUS_ARGS=()
((ACCOUNTING)) || STATUS_ARGS=(--slurm-status-command squeue)

# ---------------------------------------------------------------- work dir --------------------
if [[ -n ${EDITSCALE_SLURM_WORKDIR:-} ]]; then
    [[ -e $EDITSCALE_SLURM_WORKDIR ]] && { log "FAIL: EDITSCALE_SLURM_WORKDIR=$EDITSCALE_SLURM_WORKDIR exists"; exit 1; }
    mkdir -p "$EDITSCALE_SLURM_WORKDIR" && WORK=$(cd "$EDITSCALE_SLURM_WORKDIR" && pwd) && KEEP_WORKDIR=1
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/editscale-slurm-run.XXXXXX")
fi
if ((SMOKE)); then
    cp "$REPO/tests/slurm/smoke/Snakefile" "$WORK/Snakefile"
    mkdir -p "$WORK/profiles"
    cp -r "$REPO/profiles/slurm" "$WORK/profiles/slurm"
    CONFIG_ARGS=()
else
    tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./.snakemake --exclude=./data \
        --exclude=./results --exclude='*/__pycache__' --exclude=./.pytest_cache -cf - . | tar -C "$WORK" -xf - \
        || { log "FAIL: could not copy the repo to $WORK"; exit 1; }
    mkdir -p "$WORK/results"
    [[ -f $REPO/results/README.md ]] && cp "$REPO/results/README.md" "$WORK/results/"
    if [[ -d $REPO/data ]]; then
        # hard links: instant, no extra space, and outputs the workflow deletes or replaces
        # (atomic rename) do not touch the repo's copy; symlinks if on another filesystem
        if ! cp -al "$REPO/data" "$WORK/data" 2>/dev/null; then
            rm -rf "$WORK/data"; mkdir -p "$WORK/data"
            for f in "$REPO"/data/*; do [[ -e $f ]] && ln -s "$f" "$WORK/data/"; done
        fi
    fi
    CONFIG_ARGS=(--configfile "$CONFIG")  # relative paths resolve inside the copy
fi

# --workflow-profile none: otherwise Snakemake also applies the repo's profiles/default (local
# execution defaults) on top, and its default-resources replace the slurm profile's, dropping
# slurm_partition / slurm_account.
CMD=(snakemake --profile profiles/slurm --workflow-profile none "${CONFIG_ARGS[@]}" --cores 2
     --slurm-init-seconds-before-status-checks 2 --slurm-keep-successful-logs
     "${STATUS_ARGS[@]}" "${EXTRA[@]}")
log "running the $WHAT on SLURM in $WORK (timeout ${TIMEOUT}s)"
log "  ${CMD[*]}"
OUT=$WORK/snakemake.out
: >"$OUT"
t_run=$SECONDS
(cd "$WORK" && exec timeout -s KILL "$TIMEOUT" "${CMD[@]}") >"$OUT" 2>&1 &
sm_pid=$!
# stream progress lines while it runs
tail -n +1 -f "$OUT" --pid="$sm_pid" 2>/dev/null \
    | grep --line-buffered -E 'submitted with SLURM jobid|steps \(|Error|error:|Exiting|Nothing to be done' >&2 &
tail_pid=$!
wait "$sm_pid"
SM_RC=$?
sleep 1.5  # tail --pid notices the end within 1 s and prints the rest
kill "$tail_pid" 2>/dev/null
wait "$tail_pid" 2>/dev/null
RUN_S=$((SECONDS - t_run))

# ---------------------------------------------------------------- checks ----------------------
FAILS=()
fail() { FAILS+=("$*"); }

if ((SM_RC == 137)); then
    fail "snakemake was killed by the ${TIMEOUT}s timeout"
elif ((SM_RC != 0)); then
    fail "snakemake exited with $SM_RC"
fi
SMLOG=$(ls -t "$WORK"/.snakemake/log/*.snakemake.log 2>/dev/null | head -1)
[[ -n $SMLOG ]] || SMLOG=$OUT
grep -q 'steps (100%) done' "$SMLOG" || fail "snakemake log does not report 100% of steps done"
grep -Eq 'Error in rule|Exiting because a job execution failed|failed, SLURM status' "$SMLOG" \
    && fail "snakemake log reports a failed job"

mapfile -t SUBMITTED < <(grep -oE 'submitted with SLURM jobid [0-9]+' "$SMLOG" | awk '{print $NF}' | sort -n -u)
N_SUB=${#SUBMITTED[@]}
N_DONE=$(grep -cE '^Finished jobid' "$SMLOG" || true)
N_STEPS=$(grep -oE '[0-9]+ of [0-9]+ steps \(100%\) done' "$SMLOG" | tail -1 | awk '{print $3}')
((N_SUB > 0)) || fail "no job was submitted to SLURM (no 'submitted with SLURM jobid' line)"

JOBCOMP=$SLURM_TEST_DIR/log/jobcomp.txt
n_ok=0
for id in "${SUBMITTED[@]}"; do
    line=$(grep -E "^JobId=$id " "$JOBCOMP" 2>/dev/null | tail -1)
    jstate=$(sed -nE 's/.* JobState=([A-Z_]+).*/\1/p' <<<"$line")
    if [[ $jstate != COMPLETED ]]; then
        fail "SLURM job $id: jobcomp state '${jstate:-missing}'"
    else
        n_ok=$((n_ok + 1))
    fi
    compgen -G "$WORK/.snakemake/slurm_logs/*/$id.log" >/dev/null \
        || compgen -G "$WORK/.snakemake/slurm_logs/*/*/$id.log" >/dev/null \
        || fail "SLURM job $id: no log in .snakemake/slurm_logs"
done

SACCT_TABLE=""
if ((ACCOUNTING && N_SUB > 0)); then
    ids=$(IFS=,; echo "${SUBMITTED[*]}")
    # the accounting record can lag the job end by a moment
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        SACCT_TABLE=$(sacct -X -P -n -j "$ids" -o JobID,JobName,State,Elapsed,ExitCode 2>&1)
        [[ $(grep -c '|COMPLETED|' <<<"$SACCT_TABLE") -ge $N_SUB ]] && break
        sleep 1
    done
    n_acct=$(grep -c '|COMPLETED|' <<<"$SACCT_TABLE" || true)
    ((n_acct == N_SUB)) || fail "sacct shows $n_acct of $N_SUB submitted jobs COMPLETED"
fi

if ((SMOKE)); then
    for f in out/a.txt out/b.txt; do
        grep -qE 'slurm_job_id=[0-9]+' "$WORK/$f" 2>/dev/null || fail "smoke: $f missing or not written inside a SLURM job"
    done
fi

# ---------------------------------------------------------------- summary ---------------------
{
    echo "================ SLURM workflow test: $WHAT ================"
    echo "cluster: $SLURM_TEST_DIR  accounting(sacct)=$ACCOUNTING  status command: ${STATUS_ARGS[*]:-sacct (plugin default)}"
    echo "command: (cd $WORK && timeout -s KILL $TIMEOUT ${CMD[*]})"
    echo "snakemake exit code: $SM_RC   steps done: ${N_STEPS:-?}   jobs finished: $N_DONE   submitted to SLURM: $N_SUB   COMPLETED in SLURM: $n_ok"
    if [[ -z $SACCT_TABLE && $N_SUB -gt 0 ]]; then
        echo "jobcomp records of the submitted jobs (no accounting):"
        for id in "${SUBMITTED[@]}"; do
            grep -E "^JobId=$id " "$JOBCOMP" 2>/dev/null | tail -1 \
                | sed -nE 's/^(JobId=[0-9]+) .*(JobState=[A-Z_]+).*(StartTime=[^ ]+) (EndTime=[^ ]+).*/  \1 \2 \3 \4/p'
        done
    fi
    if [[ -n $SACCT_TABLE ]]; then
        echo "sacct -X -j <submitted ids> (JobID|JobName|State|Elapsed|ExitCode -> rule):"
        while IFS= read -r row; do
            rule=$(grep -oE "submitted with SLURM jobid ${row%%|*} \(log: [^)]*" "$SMLOG" | sed -nE 's#.*/slurm_logs/(.*)/[0-9]+\.log$#\1#p' | head -1)
            echo "  $row -> ${rule:-?}"
        done <<<"$SACCT_TABLE"
    fi
    echo "times: cluster setup ${SETUP_S}s, snakemake ${RUN_S}s, total $((SECONDS - T0))s"
    if ((${#FAILS[@]} == 0)); then
        RESULT=PASS
        echo "RESULT: PASS"
    else
        echo "RESULT: FAIL"
        for f in "${FAILS[@]}"; do echo "  - $f"; done
        echo "---- last 40 lines of snakemake output ($OUT) ----"
        tail -40 "$OUT"
    fi
} >&2
[[ $RESULT == PASS ]]
