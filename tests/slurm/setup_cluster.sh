#!/usr/bin/env bash
# Start a private one-node SLURM cluster on localhost for testing the slurm profile.
#
#   . .venv/bin/activate && tests/slurm/setup_cluster.sh && . /tmp/editscale-slurm/env.sh
#
# Run as root on Debian 12 (no systemd needed). It
#   1. apt-installs munge, slurmctld, slurmd, slurm-client (+ slurmdbd, mariadb-server when
#      accounting is on) if missing,
#   2. pip-installs snakemake-executor-plugin-slurm into the active Python environment if missing,
#   3. writes every config, key, socket, spool, log and pid file under $SLURM_TEST_DIR,
#   4. writes wrappers for the SLURM client commands into $SLURM_TEST_DIR/bin that export
#      SLURM_CONF (the plugin's jobstep executor strips SLURM_* before calling srun, so the
#      wrappers are what makes srun inside a job find this cluster), and $SLURM_TEST_DIR/env.sh,
#   5. starts munged, (mariadbd, slurmdbd,) slurmctld, slurmd with pid files, and waits until
#      the node is idle.
# Nothing under /etc is changed and no system service is started; stop everything with
# tests/slurm/teardown_cluster.sh (by pid file). Re-running while the cluster is healthy is a no-op.
#
# Environment (all optional):
#   SLURM_TEST_DIR               private directory             [/tmp/editscale-slurm]
#   EDITSCALE_SLURM_ACCOUNTING   1: slurmdbd + MariaDB, the plugin polls with sacct (its default,
#                                as on a real cluster); 0: no accounting, poll with squeue
#                                (needs --slurm-status-command squeue; MinJobAge=600 is set)  [1]
#   SLURM_TEST_PORT_BASE         ports BASE..BASE+3 for slurmctld, slurmd, slurmdbd, MariaDB
#                                (kept off the default 6817-6819)                              [16817]
#   SLURM_TEST_PARTITION         partition name (the default partition)                       [editscale]
#   SLURM_TEST_ACCOUNT           account created for root in accounting mode                  [editscale]
#   SLURM_TEST_CPUS              CPUs the node advertises (may exceed the real count)         [nproc]
#   SLURM_TEST_MEM_MB            memory the node advertises                   [90% of MemTotal]
#   SLURM_TEST_GPUS              fake GPUs (gres gpu, no device files) so GPU rules schedule  [0]
#   SLURM_TEST_SKIP_INSTALL=1    do not apt-get / pip install (fail if something is missing)
set -euo pipefail

D=${SLURM_TEST_DIR:-/tmp/editscale-slurm}
ACCOUNTING=${EDITSCALE_SLURM_ACCOUNTING:-1}
PORT_BASE=${SLURM_TEST_PORT_BASE:-16817}
PARTITION=${SLURM_TEST_PARTITION:-editscale}
ACCOUNT=${SLURM_TEST_ACCOUNT:-editscale}
GPUS=${SLURM_TEST_GPUS:-0}
CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))
CLUSTER=editscale
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf '[setup_cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (slurmd runs jobs as the submitting user; root keeps it simple)"
case "$D" in /*) ;; *) die "SLURM_TEST_DIR must be an absolute path: $D" ;; esac
[[ $ACCOUNTING == 0 || $ACCOUNTING == 1 ]] || die "EDITSCALE_SLURM_ACCOUNTING must be 0 or 1"

pid_alive() {  # pid_alive PIDFILE -> 0 if the process in PIDFILE runs
    local pf=$1 pid
    [[ -s $pf ]] || return 1
    pid=$(tr -dc '0-9' <"$pf")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

# ---------------------------------------------------------------- already running? -----------
if [[ -f $D/env.sh ]] && pid_alive "$D/run/slurmctld.pid" && pid_alive "$D/run/slurmd.pid" \
    && pid_alive "$D/run/munged.pid" \
    && { [[ ! -f $D/run/accounting ]] || pid_alive "$D/run/slurmdbd.pid"; } \
    && SLURM_CONF=$D/etc/slurm.conf sinfo -h -N -o '%t' 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; then
    log "cluster in $D is already running; nothing to do"
    echo ". $D/env.sh"
    exit 0
fi
if compgen -G "$D/run/*.pid" >/dev/null; then
    log "stopping leftovers of an earlier cluster in $D"
    SLURM_TEST_DIR=$D "$HERE/teardown_cluster.sh" || true
fi

# ---------------------------------------------------------------- packages ------------------
pkgs=(munge slurmctld slurmd slurm-client)
[[ $ACCOUNTING == 1 ]] && pkgs+=(slurmdbd mariadb-server mariadb-client)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    [[ ${SLURM_TEST_SKIP_INSTALL:-0} == 1 ]] && die "missing packages: ${missing[*]}"
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt_log=$(mktemp)
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$apt_log" 2>&1; then
        apt-get update -qq >>"$apt_log" 2>&1 || { tail -20 "$apt_log" >&2; die "apt-get update failed"; }
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$apt_log" 2>&1 \
            || { tail -20 "$apt_log" >&2; die "apt-get install failed"; }
    fi
    rm -f "$apt_log"
fi

PY=${PYTHON:-python}
command -v "$PY" >/dev/null || PY=python3
if ! "$PY" -c 'import snakemake_executor_plugin_slurm' 2>/dev/null; then
    [[ ${SLURM_TEST_SKIP_INSTALL:-0} == 1 ]] && die "snakemake-executor-plugin-slurm is not installed"
    [[ -n ${VIRTUAL_ENV:-} ]] || log "WARNING: no virtualenv active; installing into $(command -v "$PY")"
    log "pip install snakemake-executor-plugin-slurm"
    "$PY" -m pip install -q snakemake-executor-plugin-slurm || die "pip install failed"
fi

# ---------------------------------------------------------------- layout ---------------------
mkdir -p "$D"/{etc,bin,run,log,state,spool/slurmd,munge}
chmod 700 "$D" "$D/munge"
rm -f "$D/run/accounting" "$D/log/jobcomp.txt"
[[ $ACCOUNTING == 1 ]] && touch "$D/run/accounting"

CPUS=${SLURM_TEST_CPUS:-$(nproc)}
mem_total_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
MEM=${SLURM_TEST_MEM_MB:-$((mem_total_mb * 9 / 10))}
SOCK=$D/munge/munge.socket

# munge: its own key, socket, pid, log and seed, so the system munged (if any) is untouched.
[[ -s $D/munge/munge.key ]] || mungekey -c -k "$D/munge/munge.key" >/dev/null 2>&1 \
    || dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$D/munge/munge.key"

gres_node=""
gres_types=""
if ((GPUS > 0)); then
    gres_types="GresTypes=gpu"
    gres_node="Gres=gpu:$GPUS"
    # gres/gpu needs device files: character devices like /dev/null stand in for /dev/nvidia*
    # (an empty regular file also works, with an error line in slurmd.log)
    rm -rf "$D/fakegpu"
    mkdir -p "$D/fakegpu"
    : >"$D/etc/gres.conf"
    for ((g = 0; g < GPUS; g++)); do
        mknod "$D/fakegpu/gpu$g" c 1 3 2>/dev/null || : >"$D/fakegpu/gpu$g"
        echo "NodeName=localhost Name=gpu File=$D/fakegpu/gpu$g" >>"$D/etc/gres.conf"
    done
else
    rm -f "$D/etc/gres.conf"
fi

if [[ $ACCOUNTING == 1 ]]; then
    acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# with a non-default munge socket, connections to slurmdbd take the socket from here
AccountingStoragePass=$SOCK
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
    acct_lines="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

cat >"$D/etc/slurm.conf" <<EOF
# generated by tests/slurm/setup_cluster.sh: one-node test cluster on localhost
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCK
CredType=cred/munge
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/slurmd
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# containers: no cgroups, no task affinity
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without it a job without --mem gets the whole node's memory
DefMemPerCPU=100
# node values below win over what slurmd detects (lets SLURM_TEST_CPUS exceed the real count)
SlurmdParameters=config_overrides
ReturnToService=2
# keep finished jobs visible to squeue/scontrol for 10 min (squeue status mode needs this)
MinJobAge=600
# plain-text record of every finished job (works with and without slurmdbd)
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.txt
$acct_lines
$gres_types
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM $gres_node State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

DB_PASS=editscale-slurm-test
if [[ $ACCOUNTING == 1 ]]; then
    mkdir -p "$D/mysql"
    # slurmdbd has no -f: it reads slurmdbd.conf next to $SLURM_CONF, and it must be mode 600
    cat >"$D/etc/slurmdbd.conf" <<EOF
# generated by tests/slurm/setup_cluster.sh
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$D/run/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$D/etc/slurmdbd.conf"
else
    rm -f "$D/etc/slurmdbd.conf"
fi

# ---------------------------------------------------------------- wrappers --------------------
for cmd in srun sbatch salloc squeue sacct sacctmgr scancel sinfo scontrol sstat sshare sprio sreport sattach; do
    cat >"$D/bin/$cmd" <<EOF
#!/bin/sh
SLURM_CONF=$D/etc/slurm.conf
export SLURM_CONF
exec /usr/bin/$cmd "\$@"
EOF
    chmod 755 "$D/bin/$cmd"
done

cat >"$D/env.sh" <<EOF
# source me: use the test cluster in $D
export SLURM_TEST_DIR=$D
export SLURM_CONF=$D/etc/slurm.conf
case ":\$PATH:" in *":$D/bin:"*) ;; *) export PATH=$D/bin:\$PATH ;; esac
export EDITSCALE_SLURM_PARTITION=$PARTITION
EOF
[[ $ACCOUNTING == 1 ]] && echo "export EDITSCALE_SLURM_ACCOUNT=$ACCOUNT" >>"$D/env.sh"
[[ $ACCOUNTING == 0 ]] && echo "export EDITSCALE_SLURM_STATUS_ARGS='--slurm-status-command squeue'" >>"$D/env.sh"
export SLURM_CONF=$D/etc/slurm.conf
export PATH=$D/bin:$PATH

wait_for() {  # wait_for SECONDS DESCRIPTION CMD... ; dumps logs on timeout
    local t=$1 what=$2; shift 2
    local end=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= end)); then
            log "timed out after ${t}s waiting for $what; log tails:"
            for f in "$D"/log/*.log; do [[ -f $f ]] && { echo "== $f" >&2; tail -15 "$f" >&2; }; done
            exit 1
        fi
        sleep 0.5
    done
}

# ---------------------------------------------------------------- daemons ---------------------
# Every daemon gets its stdio on /dev/null or a log, so no caller's pipe is held open.
log "starting munged"
munged --force --socket="$SOCK" --key-file="$D/munge/munge.key" --pid-file="$D/run/munged.pid" \
    --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed" </dev/null >/dev/null 2>&1 \
    || { tail -5 "$D/log/munged.log" >&2; die "munged failed to start"; }
wait_for 20 "munged" sh -c "munge -S '$SOCK' -n </dev/null | unmunge -S '$SOCK'"

if [[ $ACCOUNTING == 1 ]]; then
    if [[ ! -d $D/mysql/data/mysql ]]; then
        log "initialising MariaDB in $D/mysql/data"
        rm -rf "$D/mysql/data"
        mariadb-install-db --no-defaults --datadir="$D/mysql/data" --user=root \
            --auth-root-authentication-method=socket --skip-test-db >"$D/log/mariadb-install.log" 2>&1 \
            || { tail -20 "$D/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    fi
    log "starting mariadbd (127.0.0.1:$DB_PORT)"
    setsid mariadbd --no-defaults --user=root --datadir="$D/mysql/data" --socket="$D/mysql/mysql.sock" \
        --pid-file="$D/run/mariadb.pid" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --log-error="$D/log/mariadb.log" --innodb-buffer-pool-size=128M --innodb-log-file-size=64M \
        --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
    wait_for 60 "mariadbd" mariadb --no-defaults -S "$D/mysql/mysql.sock" -u root -e 'SELECT 1'
    mariadb --no-defaults -S "$D/mysql/mysql.sock" -u root <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
    log "starting slurmdbd (port $DBD_PORT)"
    slurmdbd </dev/null >/dev/null 2>&1 || { tail -20 "$D/log/slurmdbd.log" >&2; die "slurmdbd failed to start"; }
    wait_for 60 "slurmdbd" sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
    sacctmgr -i add account "$ACCOUNT" Description="editscale test" Organization=editscale >/dev/null 2>&1 || true
    sacctmgr -i add user root Account="$ACCOUNT" DefaultAccount="$ACCOUNT" >/dev/null 2>&1 || true
    sacctmgr -n -P list associations user=root format=account | grep -qx "$ACCOUNT" \
        || die "could not associate user root with account $ACCOUNT"
fi

log "starting slurmctld (port $CTLD_PORT)"
slurmctld -f "$SLURM_CONF" </dev/null >/dev/null 2>&1 || { tail -20 "$D/log/slurmctld.log" >&2; die "slurmctld failed to start"; }
wait_for 30 "slurmctld" scontrol ping
log "starting slurmd (port $SLURMD_PORT)"
slurmd -f "$SLURM_CONF" -N localhost </dev/null >/dev/null 2>&1 || { tail -20 "$D/log/slurmd.log" >&2; die "slurmd failed to start"; }
# the node may come up down/drained (e.g. from an earlier state file): resume it once
end=$((SECONDS + 60))
resumed=0
while :; do
    state=$(sinfo -h -N -o '%t' 2>/dev/null | head -1 || true)
    case $state in
        idle|mix|alloc) break ;;
        down|drain|drng|fail|inval) ((resumed)) || { scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true; resumed=1; } ;;
    esac
    if ((SECONDS >= end)); then
        log "node did not become idle (state '$state'); log tails:"
        for f in "$D/log/slurmctld.log" "$D/log/slurmd.log"; do echo "== $f" >&2; tail -15 "$f" >&2; done
        sinfo -R >&2 || true
        exit 1
    fi
    sleep 0.5
done

log "cluster up: $(sinfo -h -o '%P %a %D %t %c cpus %m MB') accounting=$ACCOUNTING dir=$D"
cat >&2 <<EOF
Use it:      . $D/env.sh        (PATH gets the SLURM wrappers, SLURM_CONF and EDITSCALE_SLURM_* are set)
             snakemake --profile profiles/slurm --workflow-profile none --slurm-init-seconds-before-status-checks 2 \${EDITSCALE_SLURM_STATUS_ARGS:-} ...
Stop it:     tests/slurm/teardown_cluster.sh
EOF
echo ". $D/env.sh"
