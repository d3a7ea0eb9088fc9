#!/usr/bin/env bash
# A real single-node SLURM cluster on loopback, with accounting and preemption, for the
# integration tests and for trying `launcher=slurm` on one machine (Debian 12, root, no systemd).
#
#   scripts/slurm.sh up       install the Debian packages if absent, write the configs, start
#                             munged, MariaDB, slurmdbd, slurmctld and slurmd; wait until the node
#                             is idle and `sacct` works. Idempotent: a second `up` is fast.
#   scripts/slurm.sh down     stop everything `up` started.
#   scripts/slurm.sh status   print the state of each daemon; exit 0 when the cluster is usable.
#
# Partitions: `low` (default, PriorityTier=1, preemptible: jobs get their --signal, submitit's
# USR2, and are requeued) and `high` (PriorityTier=10, preempts `low`).
#
# Exit codes: 0 ok; 1 a daemon failed (the log tail is printed); 2 usage;
#             3 this machine cannot host it (not root, not Debian/apt);
#             4 the Debian packages could not be installed (e.g. no package mirror reachable).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATES="$HERE/slurm"
CLUSTER=windtunnel
DBPASS="${WINDTUNNEL_SLURM_DBPASS:-windtunnel-slurm}"
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
WAIT_S="${WINDTUNNEL_SLURM_WAIT_S:-60}"

say() { echo "slurm.sh: $*" >&2; }
die() { local code=$1; shift; say "error: $*"; exit "$code"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

usage() {
  echo "usage: $0 up|down|status" >&2
  exit 2
}

# --- can this machine host it? -------------------------------------------------------------
check_host() {
  [ "$(id -u)" = 0 ] || die 3 "needs root (it installs Debian packages and starts system daemons); running as uid $(id -u)"
  [ -f /etc/debian_version ] && command -v apt-get >/dev/null \
    || die 3 "needs Debian/Ubuntu with apt-get (found: $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME" || uname -s))"
}

# --- process helpers: PID 1 here does not reap, so dead daemons linger as zombies -------------
# alive NAME: is a non-zombie process with exactly this command name running?
alive() {
  local p st
  for p in $(pgrep -x "$1" 2>/dev/null); do
    st=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null || true)
    if [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]; then return 0; fi
  done
  return 1
}
# live_pids NAME: the non-zombie pids with this exact command name
live_pids() {
  local p st
  for p in $(pgrep -x "$1" 2>/dev/null); do
    st=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null || true)
    if [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]; then echo "$p"; fi
  done
}
# wait_for SECONDS CMD...: poll CMD every 0.2 s until it succeeds
wait_for() {
  local limit=$1; shift
  local deadline
  deadline=$(awk -v t="$(now)" -v l="$limit" 'BEGIN{printf "%f", t+l}')
  until "$@" >/dev/null 2>&1; do
    if awk -v t="$(now)" -v d="$deadline" 'BEGIN{exit !(t>d)}'; then return 1; fi
    sleep 0.2
  done
}
not_alive() { ! alive "$1"; }
log_tail() { [ -f "$1" ] && { echo "--- last lines of $1:" >&2; tail -n 20 "$1" >&2; }; return 0; }

node_state() { sinfo -h -n localhost -o %t 2>/dev/null | sort -u | head -n 1; }
node_usable() {
  case "$(node_state)" in idle | mix | mixed | alloc | allocated | comp | completing) return 0 ;; *) return 1 ;; esac
}
sacct_works() { sacct -n -X -S now-1minutes -o JobID >/dev/null 2>&1; }

# --- up --------------------------------------------------------------------------------------
install_packages() {
  local missing=0
  for b in slurmctld slurmd sinfo slurmdbd munged mariadbd; do
    command -v "$b" >/dev/null || missing=1
  done
  [ $missing = 0 ] && return 0
  local t0
  t0=$(now)
  say "installing ${PACKAGES[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die 4 "apt-get update failed (no package mirror reachable?)"
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null \
    || die 4 "apt-get install ${PACKAGES[*]} failed"
  say "packages installed in $(elapsed "$t0") s"
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if ! alive munged; then
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged || { log_tail /var/log/munge/munged.log; die 1 "munged did not start"; }
  fi
  wait_for 10 sh -c 'munge -n | unmunge' || { log_tail /var/log/munge/munged.log; die 1 "munge credentials do not round-trip"; }
}

mysql_cli() { if command -v mariadb >/dev/null; then mariadb "$@"; else mysql "$@"; fi; }

start_mariadb() {
  if ! alive mariadbd; then
    service mariadb start >/dev/null 2>&1 || true
  fi
  wait_for 30 mysql_cli -e "SELECT 1" || { log_tail /var/log/mysql/error.log; die 1 "MariaDB did not start"; }
  mysql_cli -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
    ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" \
    || die 1 "could not create the accounting database in MariaDB"
}

# write_if_changed SRC DST MODE: install SRC as DST when different; echo 1 when it changed
write_if_changed() {
  if [ -f "$2" ] && cmp -s "$1" "$2"; then echo 0; else install -m "$3" "$1" "$2"; echo 1; fi
}

write_configs() {
  local cpus mem tmp changed
  cpus=$(nproc)
  mem=$(($(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 7 / 10))
  mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"
  tmp=$(mktemp -d)
  sed -e "s/@CPUS@/$cpus/" -e "s/@MEM@/$mem/" "$TEMPLATES/slurm.conf.in" >"$tmp/slurm.conf"
  sed -e "s/@DBPASS@/$DBPASS/" "$TEMPLATES/slurmdbd.conf.in" >"$tmp/slurmdbd.conf"
  changed=$(write_if_changed "$tmp/slurm.conf" "$CONF_DIR/slurm.conf" 644)
  DBD_CHANGED=$(write_if_changed "$tmp/slurmdbd.conf" "$CONF_DIR/slurmdbd.conf" 600)
  rm -rf "$tmp"
  CONF_CHANGED=$changed
}

stop_slurm_daemons() {
  if alive slurmctld; then scontrol shutdown >/dev/null 2>&1 || true; fi
  wait_for 15 not_alive slurmctld || kill_by_pid slurmctld /run/slurmctld.pid
  wait_for 15 not_alive slurmd || kill_by_pid slurmd /run/slurmd.pid
}

# kill_by_pid NAME PIDFILE: TERM then KILL the daemon named by its pid file (or its exact name)
kill_by_pid() {
  local pids
  pids=$( { [ -f "$2" ] && cat "$2"; live_pids "$1"; } 2>/dev/null | sort -u)
  for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
  wait_for 10 not_alive "$1" && return 0
  for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
  wait_for 5 not_alive "$1" || say "warning: $1 is still running"
}

start_slurmdbd() {
  if [ "${DBD_CHANGED:-0}" = 1 ] && alive slurmdbd; then kill_by_pid slurmdbd /run/slurmdbd.pid; fi
  alive slurmdbd || slurmdbd || { log_tail $LOG_DIR/slurmdbd.log; die 1 "slurmdbd did not start"; }
  wait_for 30 sacctmgr -n list cluster || { log_tail $LOG_DIR/slurmdbd.log; die 1 "slurmdbd does not answer"; }
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die 1 "could not register cluster $CLUSTER in slurmdbd"
  fi
}

start_slurm() {
  if [ "${CONF_CHANGED:-0}" = 1 ] && { alive slurmctld || alive slurmd; }; then
    say "slurm.conf changed: restarting slurmctld and slurmd"
    stop_slurm_daemons
  fi
  if ! alive slurmctld; then
    slurmctld || { log_tail $LOG_DIR/slurmctld.log; die 1 "slurmctld did not start"; }
  fi
  if ! alive slurmd; then
    slurmd -N localhost || { log_tail $LOG_DIR/slurmd.log; die 1 "slurmd did not start"; }
  fi
  if ! wait_for "$WAIT_S" node_usable; then
    case "$(node_state)" in
      down* | drain* | drng* | fail*)
        say "node is $(node_state): resuming it"
        scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
        ;;
    esac
    wait_for 10 node_usable || {
      log_tail $LOG_DIR/slurmctld.log
      log_tail $LOG_DIR/slurmd.log
      die 1 "node did not become idle within ${WAIT_S}s (sinfo state: '$(node_state)')"
    }
  fi
  wait_for 30 sacct_works || { log_tail $LOG_DIR/slurmctld.log; die 1 "sacct does not work (accounting through slurmdbd)"; }
}

cmd_up() {
  local t0
  t0=$(now)
  check_host
  install_packages
  write_configs
  if [ "$CONF_CHANGED" = 0 ] && [ "$DBD_CHANGED" = 0 ] && alive munged && alive mariadbd \
    && alive slurmdbd && alive slurmctld && alive slurmd && node_usable && sacct_works; then
    say "already up ($(elapsed "$t0") s)"
    sinfo >&2
    return 0
  fi
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm
  say "up in $(elapsed "$t0") s"
  sinfo >&2
}

# --- down ------------------------------------------------------------------------------------
cmd_down() {
  check_host
  if command -v scontrol >/dev/null; then stop_slurm_daemons; fi
  alive slurmdbd && kill_by_pid slurmdbd /run/slurmdbd.pid
  if alive mariadbd; then
    service mariadb stop >/dev/null 2>&1 || true
    wait_for 20 not_alive mariadbd || kill_by_pid mariadbd /run/mysqld/mysqld.pid
  fi
  alive munged && kill_by_pid munged /run/munge/munged.pid
  say "down"
}

# --- status ----------------------------------------------------------------------------------
cmd_status() {
  local ok=0 d
  for d in munged mariadbd slurmdbd slurmctld slurmd; do
    if alive "$d"; then echo "$d: running"; else echo "$d: stopped"; ok=1; fi
  done
  # sinfo/sacct retry for ~10 s when their daemon is down: ask only when it runs
  if alive slurmctld && node_usable; then
    echo "node: $(node_state)"
  else
    echo "node: unavailable"
    ok=1
  fi
  if alive slurmdbd && sacct_works; then echo "sacct: ok"; else
    echo "sacct: failing"
    ok=1
  fi
  return $ok
}

[ $# = 1 ] || usage
# One `up`/`down` at a time (two test sessions may start together). The lock is held by the
# flock process; -o keeps its descriptor out of this script, so the daemons do not inherit it.
if { [ "$1" = up ] || [ "$1" = down ]; } && [ "${WINDTUNNEL_SLURM_LOCKED:-}" != 1 ]; then
  check_host
  WINDTUNNEL_SLURM_LOCKED=1 exec flock -o -E 1 -w 600 /run/windtunnel-slurm.lock bash "$0" "$1"
fi
unset WINDTUNNEL_SLURM_LOCKED
case "$1" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) usage ;;
esac
