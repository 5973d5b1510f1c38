#!/usr/bin/env bash
# Stop the test cluster started by tests/slurm/setup_cluster.sh.
#
#   tests/slurm/teardown_cluster.sh [--purge]
#
# Only the daemons recorded in $SLURM_TEST_DIR/run/*.pid are stopped (by pid, after checking that
# the pid still belongs to the expected program); nothing is killed by name. Jobs still in the
# queue are cancelled first so that no slurmstepd / job processes outlive slurmd.
# --purge also deletes $SLURM_TEST_DIR (configs, logs, MariaDB data).
set -uo pipefail

D=${SLURM_TEST_DIR:-/tmp/editscale-slurm}
PURGE=0
[[ ${1:-} == --purge ]] && PURGE=1

log() { printf '[teardown_cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

[[ -d $D/run ]] || { log "nothing to stop in $D"; ((PURGE)) && rm -rf "$D"; exit 0; }

read_pid() { [[ -s $1 ]] && tr -dc '0-9' <"$1"; }

# stop_daemon NAME PIDFILE EXPECTED_EXE_BASENAME...
stop_daemon() {
    local name=$1 pf=$2 pid exe ok=0 i
    shift 2
    pid=$(read_pid "$pf")
    if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; then
        rm -f "$pf"
        return 0
    fi
    exe=$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null)" 2>/dev/null)
    for e in "$@"; do [[ $exe == "$e" ]] && ok=1; done
    if ((!ok)); then
        log "pid $pid in $pf is '$exe', not $name: leaving it alone"
        rm -f "$pf"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 60; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) ignored SIGTERM for 15 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null
        sleep 0.5
    fi
    rm -f "$pf"
}

# Cancel what is left in the queue (this private cluster only) while slurmctld/slurmd still run.
if [[ -x $D/bin/squeue ]] && [[ -n $(read_pid "$D/run/slurmctld.pid") ]] \
    && kill -0 "$(read_pid "$D/run/slurmctld.pid")" 2>/dev/null; then
    jobs=$("$D/bin/squeue" -h -t PD,R,CG,S -o '%i' 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        "$D/bin/scancel" $jobs 2>/dev/null
        for ((i = 0; i < 60; i++)); do
            [[ -z $("$D/bin/squeue" -h -t PD,R,CG,S -o '%i' 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
fi

stop_daemon slurmd "$D/run/slurmd.pid" slurmd slurmd-wlm
stop_daemon slurmctld "$D/run/slurmctld.pid" slurmctld slurmctld-wlm
stop_daemon slurmdbd "$D/run/slurmdbd.pid" slurmdbd slurmdbd-wlm
stop_daemon mariadbd "$D/run/mariadb.pid" mariadbd mysqld
stop_daemon munged "$D/run/munged.pid" munged

if ((PURGE)); then
    log "removing $D"
    rm -rf "$D"
fi
exit 0
