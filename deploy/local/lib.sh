# shellcheck shell=bash
#
# Shared functions for the local stack scripts (deploy/local/up, down, test).
#
# Source it from a script that runs under `set -euo pipefail`:
#
#     source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Every function either succeeds or returns non-zero after printing why, so the
# caller's `set -e` stops the script. Nothing here kills Postgres or Redis, and
# nothing stops a process that is not named by one of our own pid files.

# ---------------------------------------------------------------------------
# Locations and fixed settings
# ---------------------------------------------------------------------------

LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# The repository root: git's top level when this file is inside that work tree,
# otherwise two levels up from deploy/local (e.g. in an exported tarball).
ROOT="$(git -C "$LIB_DIR" rev-parse --show-toplevel 2>/dev/null || true)"
if [[ -z "$ROOT" || ! -f "$ROOT/deploy/local/lib.sh" ]]; then
    ROOT="$(cd "$LIB_DIR/../.." && pwd)"
fi

# Logs, pid files and the generated env file (git-ignored: /.stack).
STACK_DIR="$ROOT/.stack"
STACK_ENV="$STACK_DIR/env"
RELEASE_DIR="$ROOT/target/release"

# The binaries must come from $ROOT/target, whatever the caller's shell says.
unset CARGO_TARGET_DIR

# `cargo install` puts nisshi here; a fresh CI shell may not have it on PATH.
CARGO_BIN_DIR="${CARGO_HOME:-${HOME:-/root}/.cargo}/bin"
case ":$PATH:" in
    *":$CARGO_BIN_DIR:"*) ;;
    *) PATH="$CARGO_BIN_DIR:$PATH" ;;
esac
export PATH

PG_HOST=127.0.0.1
PG_PORT=5432
PG_CLUSTER=main
REDIS_HOST=127.0.0.1
REDIS_PORT=6379

NISSHI_VERSION=0.8.1
BROKER_HOST=127.0.0.1
BROKER_PORT=9092
BROKER_URL="tcp://$BROKER_HOST:$BROKER_PORT"
# Storage of a broker that ensure_broker starts. memory:// loses everything on
# restart; for a durable broker use a *relative* sqlite URL, e.g.
# NISSHI_STORAGE=sqlite://nisshi.db (relative to $STACK_DIR, the broker's cwd).
NISSHI_STORAGE="${NISSHI_STORAGE:-memory://nisshi/}"
# RUST_LOG of a broker that ensure_broker starts (default: nisshi's own).
# NISSHI_RUST_LOG=debug
# Partitions for create_topics.
PARTITIONS="${PARTITIONS:-16}"

# Set to 1 by ensure_broker when it started a new broker (so `up` knows that
# topics and consumer groups of a memory:// broker are brand new).
# shellcheck disable=SC2034  # read by deploy/local/up
BROKER_STARTED=0

# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

log() { printf '==> %s\n' "$*"; }
warn() { printf '==> WARNING: %s\n' "$*" >&2; }
# die MESSAGE: print MESSAGE and exit the script (works even where set -e is
# suspended, e.g. inside `if some_function`).
die() {
    printf '==> ERROR: %s\n' "$*" >&2
    exit 1
}
# fail MESSAGE: print MESSAGE and return 1, for functions whose caller may
# want to react (wait_http, wait_port).
fail() {
    printf '==> ERROR: %s\n' "$*" >&2
    return 1
}

# ensure_stack_dir: create $ROOT/.stack.
ensure_stack_dir() { mkdir -p "$STACK_DIR"; }

# port_open HOST PORT: true if a TCP connection to HOST:PORT succeeds (2 s max).
port_open() {
    # shellcheck disable=SC2016  # expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# wait_port HOST PORT [TIMEOUT_S]: wait until HOST:PORT accepts connections.
wait_port() {
    local host="$1" port="$2" timeout_s="${3:-30}"
    local deadline=$((SECONDS + timeout_s))
    until port_open "$host" "$port"; do
        if ((SECONDS >= deadline)); then
            fail "$host:$port did not accept connections within ${timeout_s}s"
            return 1
        fi
        sleep 0.5
    done
}

# wait_http URL [TIMEOUT_S]: wait until GET URL answers 2xx (default 60 s).
wait_http() {
    local url="$1" timeout_s="${2:-60}"
    local deadline=$((SECONDS + timeout_s))
    until curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            fail "$url did not answer 2xx within ${timeout_s}s"
            return 1
        fi
        sleep 0.5
    done
}

# pid_alive PID: true if PID is a running (not zombie) process.
pid_alive() {
    local pid="$1" state
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != Z ]]
}

# pid_exe PID: the executable PID runs, as /proc shows it (may end " (deleted)"
# when the file was replaced since, e.g. by a rebuild).
pid_exe() { readlink "/proc/$1/exe" 2>/dev/null || true; }

# read_pidfile FILE: print the pid in FILE (empty if missing or not a number).
read_pidfile() {
    local pid=""
    [[ -f "$1" ]] && pid="$(tr -dc '0-9' <"$1" 2>/dev/null || true)"
    printf '%s' "$pid"
}

# pidfile_live FILE [NAME]: print the pid and succeed if FILE names a live
# process whose executable is called NAME (default: FILE's name without .pid).
# Guards against a stale pid file whose pid now belongs to something else.
pidfile_live() {
    local file="$1" name="${2:-$(basename "$1" .pid)}" pid exe
    pid="$(read_pidfile "$file")"
    pid_alive "$pid" || return 1
    exe="$(pid_exe "$pid")"
    exe="${exe% (deleted)}"
    [[ "$(basename "$exe")" == "$name" ]] || return 1
    printf '%s' "$pid"
}

# show_log FILE [LINES]: print the last lines of a log, to explain a failure.
show_log() {
    local file="$1" lines="${2:-40}"
    if [[ -s "$file" ]]; then
        printf '==> last %s lines of %s:\n' "$lines" "$file" >&2
        tail -n "$lines" "$file" | sed 's/^/    /' >&2
    else
        printf '==> %s is empty or missing\n' "$file" >&2
    fi
}

# ---------------------------------------------------------------------------
# Postgres and Redis (started if stopped, never stopped)
# ---------------------------------------------------------------------------

# ensure_postgres: make sure Postgres answers on 127.0.0.1:5432.
ensure_postgres() {
    if pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; then
        log "postgres is up on $PG_HOST:$PG_PORT"
        return 0
    fi
    local version
    # shellcheck disable=SC2012  # version directory names are plain numbers
    version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)"
    [[ -n "$version" ]] || die "postgres is down and no cluster exists under /etc/postgresql"
    log "starting postgres $version/$PG_CLUSTER"
    pg_ctlcluster --skip-systemctl-redirect "$version" "$PG_CLUSTER" start
    local deadline=$((SECONDS + 30))
    until pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; do
        ((SECONDS < deadline)) || die "postgres did not become ready within 30s"
        sleep 0.5
    done
    log "postgres is up on $PG_HOST:$PG_PORT"
}

# redis_ping: true if Redis answers PING with PONG.
redis_ping() {
    [[ "$(timeout 3 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]
}

# ensure_machete: make sure cargo-machete (the unused-dependency check) is installed.
MACHETE_VERSION="${MACHETE_VERSION:-0.9.2}"
ensure_machete() {
    if cargo machete --version 2>/dev/null | grep -q "$MACHETE_VERSION"; then
        return 0
    fi
    log "installing cargo-machete $MACHETE_VERSION (about 2 minutes)"
    cargo install cargo-machete --version "$MACHETE_VERSION" --locked
}

# ensure_docker_compose: make sure docker-compose (Debian's package) is installed: the
# deployment test (shared/tests/deploy_manifests.rs) validates deploy/compose with it. No Docker
# engine is needed for `docker-compose config`.
ensure_docker_compose() {
    if command -v docker-compose >/dev/null 2>&1; then
        return 0
    fi
    log "installing docker-compose (Debian package)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
    command -v docker-compose >/dev/null 2>&1 || die "docker-compose is still missing after apt-get install"
}

# ensure_redis: make sure Redis answers on 127.0.0.1:6379.
ensure_redis() {
    if redis_ping; then
        log "redis is up on $REDIS_HOST:$REDIS_PORT"
        return 0
    fi
    log "starting redis"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
        --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    local deadline=$((SECONDS + 30))
    until redis_ping; do
        ((SECONDS < deadline)) || die "redis did not answer PING within 30s (see /var/log/redis/ci.log)"
        sleep 0.5
    done
    log "redis is up on $REDIS_HOST:$REDIS_PORT"
}

# ensure_redis_cluster: a local Redis Cluster of three masters, each with one replica
# (redis-server --cluster-enabled yes on 127.0.0.1:$REDIS_CLUSTER_PORT.. +5, data in
# $STACK_DIR/redis-cluster/PORT, nothing persisted), created with `redis-cli --cluster create`
# once and reused while its nodes run. Sets REDIS_CLUSTER_URL (redis+cluster://seed,nodes).
REDIS_CLUSTER_PORT="${REDIS_CLUSTER_PORT:-7100}"
REDIS_CLUSTER_DIR="$STACK_DIR/redis-cluster"
redis_cluster_ports() { seq "$REDIS_CLUSTER_PORT" $((REDIS_CLUSTER_PORT + 5)); }
redis_cluster_ok() {
    local p
    for p in $(redis_cluster_ports); do
        timeout 3 redis-cli -p "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
    done
}
# redis_cluster_start_node PORT: start (or restart) one node with its nodes.conf.
redis_cluster_start_node() {
    local p="$1" d="$REDIS_CLUSTER_DIR/$1"
    mkdir -p "$d"
    redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file nodes.conf \
        --cluster-node-timeout 2000 --dir "$d" --save "" --appendonly no --maxmemory-policy noeviction \
        --daemonize yes --pidfile "$d/redis.pid" --logfile "$d/redis.log"
}
ensure_redis_cluster() {
    local nodes="" p
    for p in $(redis_cluster_ports); do nodes+="${nodes:+,}127.0.0.1:$p"; done
    REDIS_CLUSTER_URL="redis+cluster://$nodes"
    export REDIS_CLUSTER_URL REDIS_CLUSTER_DIR
    if redis_cluster_ok; then
        log "redis cluster is up on 127.0.0.1:$REDIS_CLUSTER_PORT-$((REDIS_CLUSTER_PORT + 5))"
        return 0
    fi
    log "starting a redis cluster (3 masters, 3 replicas) on 127.0.0.1:$REDIS_CLUSTER_PORT-$((REDIS_CLUSTER_PORT + 5))"
    for p in $(redis_cluster_ports); do
        if [[ "$(timeout 3 redis-cli -p "$p" ping 2>/dev/null)" == PONG ]]; then
            # A node from an earlier, broken cluster: start over.
            redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true
        fi
    done
    sleep 0.5
    rm -rf "$REDIS_CLUSTER_DIR"
    for p in $(redis_cluster_ports); do redis_cluster_start_node "$p"; done
    local deadline=$((SECONDS + 30))
    for p in $(redis_cluster_ports); do
        until [[ "$(timeout 3 redis-cli -p "$p" ping 2>/dev/null)" == PONG ]]; do
            ((SECONDS < deadline)) || die "redis cluster node $p did not start (see $REDIS_CLUSTER_DIR/$p/redis.log)"
            sleep 0.2
        done
    done
    # shellcheck disable=SC2046
    redis-cli --cluster create $(for p in $(redis_cluster_ports); do printf '127.0.0.1:%s ' "$p"; done) \
        --cluster-replicas 1 --cluster-yes >"$REDIS_CLUSTER_DIR/create.log" 2>&1 ||
        die "redis-cli --cluster create failed (see $REDIS_CLUSTER_DIR/create.log)"
    deadline=$((SECONDS + 60))
    until redis_cluster_ok; do
        ((SECONDS < deadline)) || die "the redis cluster did not reach cluster_state:ok in 60s"
        sleep 0.5
    done
    # Every master has its replica attached before anyone relies on WAIT.
    deadline=$((SECONDS + 60))
    until [[ "$(for p in $(redis_cluster_ports); do redis-cli -p "$p" info replication; done |
        grep -c '^connected_slaves:1')" -ge 3 ]]; do
        ((SECONDS < deadline)) || die "the redis cluster's replicas did not attach in 60s"
        sleep 0.5
    done
    log "redis cluster is up: $REDIS_CLUSTER_URL"
}
stop_redis_cluster() {
    local p
    for p in $(redis_cluster_ports); do
        redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true
    done
}

# ---------------------------------------------------------------------------
# nisshi (the Kafka-API broker)
# ---------------------------------------------------------------------------

# nisshi_ok: true if `nisshi --version` reports $NISSHI_VERSION.
nisshi_ok() {
    command -v nisshi >/dev/null 2>&1 &&
        [[ "$(nisshi --version 2>/dev/null)" == *" $NISSHI_VERSION"* ]]
}

# nisshi_install_running: true while some `cargo install nisshi` runs.
# The pattern needs cargo as argv[0], so it does not match a shell whose
# command line merely mentions the words.
nisshi_install_running() {
    pgrep -f '(^|/)cargo install nisshi' >/dev/null 2>&1
}

# ensure_nisshi: make sure nisshi $NISSHI_VERSION is on PATH. Waits for an
# install already in progress (up to NISSHI_INSTALL_WAIT seconds, default
# 1800) rather than starting a second one; installs it otherwise (~12 min).
ensure_nisshi() {
    if nisshi_ok; then
        log "nisshi $NISSHI_VERSION is installed ($(command -v nisshi))"
        return 0
    fi
    if nisshi_install_running; then
        local wait_s="${NISSHI_INSTALL_WAIT:-1800}"
        local deadline=$((SECONDS + wait_s))
        log "a 'cargo install nisshi' is already running; waiting for it (up to ${wait_s}s)"
        while nisshi_install_running; do
            ((SECONDS < deadline)) || die "'cargo install nisshi' still running after ${wait_s}s"
            sleep 10
        done
        hash -r
    fi
    if ! nisshi_ok; then
        log "installing nisshi $NISSHI_VERSION (takes ~12 minutes)"
        cargo install nisshi --version "$NISSHI_VERSION" --locked --ignore-rust-version
        hash -r
    fi
    nisshi_ok || die "nisshi --version does not report $NISSHI_VERSION (got: $(nisshi --version 2>&1 || true))"
    log "nisshi $NISSHI_VERSION is installed ($(command -v nisshi))"
}

# ensure_broker: make sure a broker accepts connections on 127.0.0.1:9092.
# Reuses whatever already listens there; otherwise starts nisshi in the
# background (own session, nohup) with storage $NISSHI_STORAGE, cwd
# $STACK_DIR, log $STACK_DIR/nisshi.log, pid $STACK_DIR/nisshi.pid.
ensure_broker() {
    ensure_stack_dir
    local pidfile="$STACK_DIR/nisshi.pid" logfile="$STACK_DIR/nisshi.log" pid

    # A broker of ours that is still starting: give it time to open its port.
    if ! port_open "$BROKER_HOST" "$BROKER_PORT" && pid="$(pidfile_live "$pidfile")"; then
        log "broker (pid $pid) is starting; waiting for $BROKER_HOST:$BROKER_PORT"
        if ! wait_port "$BROKER_HOST" "$BROKER_PORT" 30; then
            show_log "$logfile"
            die "broker pid $pid never opened its port (stop it with deploy/local/down)"
        fi
    fi

    if port_open "$BROKER_HOST" "$BROKER_PORT"; then
        if pid="$(pidfile_live "$pidfile")"; then
            log "broker is running on $BROKER_URL (pid $pid, pid file $pidfile)"
        else
            log "reusing the broker already listening on $BROKER_URL (not started by these scripts)"
        fi
        return 0
    fi

    # An absolute sqlite path gets doubled by nisshi; refuse it up front.
    case "$NISSHI_STORAGE" in
        sqlite:///*) die "NISSHI_STORAGE=$NISSHI_STORAGE: use a relative sqlite path (sqlite://nisshi.db, relative to $STACK_DIR)" ;;
    esac

    rm -f "$pidfile"
    if [[ -f "$logfile" ]]; then mv -f "$logfile" "$logfile.1"; fi
    log "starting nisshi broker on $BROKER_URL (storage $NISSHI_STORAGE, log $logfile)"
    # setsid: own session, so ^C in the calling terminal does not reach it.
    # The inner bash writes its own pid and then execs, so the pid file holds
    # the broker's pid even if setsid had to fork.
    (
        cd "$STACK_DIR" || exit 1
        # The services' RUST_LOG is not meant for the broker (debug logging
        # slows it down a lot); NISSHI_RUST_LOG sets the broker's own.
        unset RUST_LOG
        if [[ -n "${NISSHI_RUST_LOG:-}" ]]; then export RUST_LOG="$NISSHI_RUST_LOG"; fi
        # shellcheck disable=SC2016  # expanded by the inner bash
        exec setsid bash -c 'echo $$ >"$0"; exec nohup "$@"' "$pidfile" \
            nisshi broker \
            --listener-url "$BROKER_URL" \
            --advertised-listener-url "$BROKER_URL" \
            --storage-engine "$NISSHI_STORAGE"
    ) >"$logfile" 2>&1 </dev/null &

    local deadline=$((SECONDS + 30))
    until port_open "$BROKER_HOST" "$BROKER_PORT"; do
        pid="$(read_pidfile "$pidfile")"
        if [[ -n "$pid" ]] && ! pid_alive "$pid"; then
            show_log "$logfile"
            die "nisshi broker exited during startup"
        fi
        if ((SECONDS >= deadline)); then
            show_log "$logfile"
            die "nisshi broker did not open $BROKER_HOST:$BROKER_PORT within 30s"
        fi
        sleep 0.5
    done
    # shellcheck disable=SC2034  # read by deploy/local/up
    BROKER_STARTED=1
    log "broker is up on $BROKER_URL (pid $(read_pidfile "$pidfile"), pid file $pidfile)"
}

# list_topics: print "NAME PARTITIONS" for every topic on the broker.
list_topics() {
    # nisshi logs to stdout; keep a caller's RUST_LOG=debug out of the JSON.
    RUST_LOG=warn nisshi topic list --broker "$BROKER_URL" |
        jq -r '.[] | "\(.name) \(.partitions | length)"'
}

# create_topics NAME...: create each topic with $PARTITIONS partitions (16
# unless PARTITIONS is set). A topic that exists already is fine; a warning is
# printed if its partition count differs.
create_topics() {
    local existing="" name out have
    existing="$(list_topics 2>/dev/null || true)"
    for name in "$@"; do
        have="$(awk -v n="$name" '$1 == n { print $2 }' <<<"$existing")"
        if [[ -n "$have" ]]; then
            if [[ "$have" != "$PARTITIONS" ]]; then
                warn "topic $name exists with $have partitions, not $PARTITIONS (left as is)"
            else
                log "topic $name exists ($have partitions)"
            fi
            continue
        fi
        if out="$(RUST_LOG=warn nisshi topic create "$name" --partitions "$PARTITIONS" --broker "$BROKER_URL" 2>&1)"; then
            log "created topic $name ($PARTITIONS partitions)"
        elif grep -qiE 'already ?exists' <<<"$out"; then
            # Created by someone else between the list and the create.
            log "topic $name exists"
        else
            printf '%s\n' "$out" >&2
            die "could not create topic $name"
        fi
    done
}

# ---------------------------------------------------------------------------
# Service processes
# ---------------------------------------------------------------------------
#
# Each service runs under a supervisor, as systemd or Kubernetes would run it in
# production: a bash loop (supervise_service, own session, nohup) that starts
# $ROOT/target/release/NAME, waits for it and, whenever it exits for any reason
# other than a deliberate stop (exit 75 on a fatal Kafka producer error, a
# panic, a kill -9, even a clean exit), appends a "[supervisor] ..." line to
# NAME.log and starts it again with the same environment and arguments, after
# 1 s (doubling up to 10 s while it keeps dying within 10 s of its start).
#
#   $STACK_DIR/NAME.pid             the service process itself, rewritten at
#                                   every (re)start; `kill -9 $(cat .stack/rater.pid)`
#                                   is a crash that the supervisor recovers from
#   $STACK_DIR/supervisor/NAME.pid  its supervisor; SIGTERM to it is a deliberate
#                                   stop (SIGTERM to the service, no restart)
#
# stop_service (and stop_pidfile on NAME.pid, deploy/local/down, up's restarts)
# stops both.

# Restart delay: RESTART_DELAY_MIN_S, doubled for each further exit within
# RESTART_FAST_S seconds of the start, at most RESTART_DELAY_MAX_S.
RESTART_DELAY_MIN_S=1
RESTART_DELAY_MAX_S=10
RESTART_FAST_S=10
# SIGTERM to SIGKILL, in stop_pidfile and stop_service.
STOP_GRACE_S=15
# wait_service_ready gives up on a service that exits this many times first.
READY_MAX_EXITS=3

# supervisor_pidfile NAME: the pid file of NAME's supervisor.
supervisor_pidfile() { printf '%s' "$STACK_DIR/supervisor/$1.pid"; }

# supervisor_live NAME: print the pid and succeed if NAME's supervisor runs
# (a live process whose command line carries the tag start_service gives it).
supervisor_live() {
    local name="$1" pid
    pid="$(read_pidfile "$(supervisor_pidfile "$name")")"
    pid_alive "$pid" || return 1
    grep -qzxF "stack-supervisor:$name" "/proc/$pid/cmdline" 2>/dev/null || return 1
    printf '%s' "$pid"
}

# service_exits NAME: how many exits NAME's supervisor has logged in NAME.log.
service_exits() {
    local n
    n="$(grep -cF "[supervisor] $1 exited with status" "$STACK_DIR/$1.log" 2>/dev/null)" || true
    printf '%s' "${n:-0}"
}

# supervise_service NAME PIDFILE SUPFILE BIN [ARGS...]: the supervisor loop
# described above: writes its own pid to SUPFILE, runs BIN ARGS again and again
# and writes the pid of each run to PIDFILE. start_service runs it in its own
# session, with the environment of $STACK_ENV and stdout and stderr on NAME's
# log. Returns after a deliberate stop: SIGTERM (or SIGINT) to the supervisor,
# which it forwards to the service as SIGTERM and then waits for the service to
# exit, without restarting it.
supervise_service() {
    local name="$1" pidfile="$2" supfile="$3" bin="$4"
    shift 4
    local child="" last="" sleeper="" stopping=0 status started ran sig
    local restarts=0 delay="$RESTART_DELAY_MIN_S"
    # No errexit here: the supervisor must outlive any failing command of its own.
    set +e
    # (Unquoted: the pids are numbers, or empty when there is none.)
    trap 'stopping=1; kill -TERM $child $sleeper 2>/dev/null' TERM INT

    mkdir -p "${supfile%/*}"
    printf '%s\n' "$$" >"$supfile"
    while ((!stopping)); do
        # A subshell that execs (not plain `"$bin" &`, whose child would ignore
        # SIGINT and SIGQUIT): the service starts with default signal handling
        # (but SIGHUP, ignored as under nohup) and its pid is $!.
        (exec "$bin" "$@") &
        child=$!
        last=$child
        printf '%s\n' "$child" >"$pidfile.tmp" && mv -f "$pidfile.tmp" "$pidfile"
        # A stop that arrived while the service was being started.
        if ((stopping)); then kill -TERM "$child" 2>/dev/null; fi
        started=$SECONDS
        # A trapped signal ends wait early (status > 128) while the service may
        # still run: wait again until it is gone. (2>/dev/null: bash's own
        # "Killed" report; the line below says it better.)
        wait "$child" 2>/dev/null
        status=$?
        while kill -0 "$child" 2>/dev/null; do
            wait "$child" 2>/dev/null
            status=$?
        done
        child=""
        ran=$((SECONDS - started))
        sig=""
        if ((status > 128)); then
            sig=" (signal $(kill -l "$((status - 128))" 2>/dev/null || echo "$((status - 128))"))"
        fi
        if ((stopping)); then
            printf '[supervisor] %s exited with status %s%s at %s; stopped deliberately, not restarting\n' \
                "$name" "$status" "$sig" "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
            break
        fi
        restarts=$((restarts + 1))
        if ((ran >= RESTART_FAST_S)); then
            delay="$RESTART_DELAY_MIN_S"
        elif ((restarts > 1)); then
            delay=$((delay * 2 > RESTART_DELAY_MAX_S ? RESTART_DELAY_MAX_S : delay * 2))
        fi
        printf '[supervisor] %s exited with status %s%s at %s after %ss; restarting in %ss (restart #%s)\n' \
            "$name" "$status" "$sig" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$ran" "$delay" "$restarts"
        # In the background, so that a stop need not wait for the sleep.
        sleep "$delay" &
        sleeper=$!
        if ((stopping)); then kill -TERM "$sleeper" 2>/dev/null; fi
        wait "$sleeper" 2>/dev/null
        sleeper=""
        if ((stopping)); then
            printf '[supervisor] %s: stopped deliberately while waiting to restart it\n' "$name"
        fi
    done
    # Our pid files, unless a newer supervisor has taken them over.
    [[ "$(read_pidfile "$pidfile")" != "$last" ]] || rm -f "$pidfile"
    [[ "$(read_pidfile "$supfile")" != "$$" ]] || rm -f "$supfile"
}

# start_service NAME [ARGS...]: run $ROOT/target/release/NAME ARGS under a
# supervisor (see above), in the background (own session, nohup) with the
# environment of $STACK_ENV; log to $STACK_DIR/NAME.log (the previous one is
# kept as NAME.log.1), pid of the service to $STACK_DIR/NAME.pid, of the
# supervisor to $STACK_DIR/supervisor/NAME.pid. A supervised NAME process
# running the current binary is left running. One running a binary that has
# since been rebuilt, one without a supervisor (started by an older version of
# these scripts) and a supervisor between two restarts of its service are
# stopped and started afresh.
start_service() {
    # NAME may carry an instance suffix (ledger-writer@2): the binary is NAME without it.
    local name="$1"
    shift
    local exe_name="${name%@*}"
    local bin="$RELEASE_DIR/$exe_name"
    local pidfile="$STACK_DIR/$name.pid" logfile="$STACK_DIR/$name.log" supfile pid sup exe
    supfile="$(supervisor_pidfile "$name")"

    [[ -x "$bin" ]] || die "$bin is missing: build first (cargo build --release --workspace --bins)"
    [[ -f "$STACK_ENV" ]] || die "$STACK_ENV is missing (deploy/local/up writes it)"

    pid="$(pidfile_live "$pidfile" "$exe_name")" || pid=""
    sup="$(supervisor_live "$name")" || sup=""
    if [[ -n "$pid" && -n "$sup" ]]; then
        exe="$(pid_exe "$pid")"
        if [[ "$exe" == "$(readlink -f "$bin")" ]]; then
            log "$name is already running (pid $pid, supervisor pid $sup)"
            return 0
        fi
        log "$name (pid $pid) runs an older build; restarting it"
    elif [[ -n "$sup" ]]; then
        log "$name is between two restarts by its supervisor (pid $sup); starting it afresh"
    elif [[ -n "$pid" ]]; then
        log "$name (pid $pid) runs without a supervisor; restarting it under one"
    fi
    if [[ -n "$pid$sup" ]]; then stop_service "$name"; fi

    rm -f "$pidfile" "$supfile"
    mkdir -p "${supfile%/*}"
    if [[ -f "$logfile" ]]; then mv -f "$logfile" "$logfile.1"; fi
    (
        set -a
        # shellcheck source=/dev/null
        source "$STACK_ENV"
        set +a
        cd "$ROOT" || exit 1
        # setsid: own session, so ^C in the calling terminal does not reach it.
        # Its $0 tags the supervisor's command line for supervisor_live.
        # shellcheck disable=SC2016  # expanded by the inner bash
        exec setsid nohup bash -c 'source "$1" && shift && supervise_service "$@"' \
            "stack-supervisor:$name" "$LIB_DIR/lib.sh" "$name" "$pidfile" "$supfile" "$bin" "$@"
    ) >"$logfile" 2>&1 </dev/null &

    # Wait for the supervisor to write both pid files.
    local deadline=$((SECONDS + 5))
    until [[ -s "$pidfile" && -s "$supfile" ]]; do
        if ((SECONDS >= deadline)); then
            show_log "$logfile"
            die "the supervisor of $name did not write $pidfile and $supfile"
        fi
        sleep 0.1
    done
    log "started $name (pid $(read_pidfile "$pidfile"), supervisor pid $(read_pidfile "$supfile"), log $logfile)"
}

# wait_service_ready NAME URL [TIMEOUT_S]: wait until URL answers 2xx while
# the process in $STACK_DIR/NAME.pid is alive (default 60 s). Exits of the
# service that its supervisor restarts are tolerated, up to READY_MAX_EXITS in
# NAME.log (that is, since its supervisor started). On failure (timeout, that
# many exits, or neither service nor supervisor left) prints the tail of
# NAME.log and returns 1.
wait_service_ready() {
    local name="$1" url="$2" timeout_s="${3:-60}"
    local exe_name="${name%@*}"
    local pidfile="$STACK_DIR/$name.pid" logfile="$STACK_DIR/$name.log"
    local deadline=$((SECONDS + timeout_s)) exits
    while :; do
        if pidfile_live "$pidfile" "$exe_name" >/dev/null &&
            curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; then
            # Still ours? (A leftover process may hold the port while ours
            # failed to bind and exited.)
            sleep 0.2
            if pidfile_live "$pidfile" "$exe_name" >/dev/null; then
                return 0
            fi
        fi
        if ! pidfile_live "$pidfile" "$exe_name" >/dev/null && ! supervisor_live "$name" >/dev/null; then
            show_log "$logfile"
            fail "$name exited before it was ready (and no supervisor restarts it)"
            return 1
        fi
        exits="$(service_exits "$name")"
        if ((exits >= READY_MAX_EXITS)); then
            show_log "$logfile"
            fail "$name exited $exits times before it was ready (its supervisor keeps restarting it; deploy/local/down stops it)"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            show_log "$logfile"
            fail "$name: $url did not answer 2xx within ${timeout_s}s"
            return 1
        fi
        sleep 0.5
    done
}

# terminate_pid PID LABEL: SIGTERM to PID; SIGKILL if it still runs after
# STOP_GRACE_S seconds.
terminate_pid() {
    local pid="$1" label="$2"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_GRACE_S))
    while pid_alive "$pid"; do
        if ((SECONDS >= deadline)); then
            warn "$label (pid $pid) still running after ${STOP_GRACE_S}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
}

# stop_pidfile FILE [NAME]: stop the process FILE names (SIGTERM, up to 15 s,
# then SIGKILL) and remove FILE. Only a live process whose executable is called
# NAME (default: FILE's name without .pid) is signalled; a stale pid file is
# just removed. FILE of a supervised service ($STACK_DIR/NAME.pid) stops the
# service and its supervisor (stop_service), so that it is not restarted.
stop_pidfile() {
    local file="$1" name="${2:-$(basename "$1" .pid)}" pid
    if [[ "$(dirname "$file")" == "$STACK_DIR" ]] && supervisor_live "$(basename "$file" .pid)" >/dev/null; then
        stop_service "$(basename "$file" .pid)"
        return 0
    fi
    [[ -f "$file" ]] || return 0
    if ! pid="$(pidfile_live "$file" "$name")"; then
        log "$file names no running $name; removing it"
        rm -f "$file"
        return 0
    fi
    log "stopping $name (pid $pid)"
    terminate_pid "$pid" "$name"
    rm -f "$file"
}

# stop_service NAME: stop service NAME (ingest, rater, ledger-writer@2, ...) for
# good: SIGTERM to its supervisor, which forwards it to the service (a graceful
# drain) and exits without restarting it; after STOP_GRACE_S seconds, SIGKILL
# to the service (and to the supervisor if it lingers). A service left without
# a supervisor (e.g. the supervisor was killed) is stopped by its pid file.
# Removes both pid files. Does nothing if neither runs.
stop_service() {
    local name="$1"
    local exe_name="${name%@*}" pidfile="$STACK_DIR/$name.pid" supfile sup pid
    supfile="$(supervisor_pidfile "$name")"
    if sup="$(supervisor_live "$name")"; then
        pid="$(pidfile_live "$pidfile" "$exe_name")" || pid=""
        log "stopping $name (pid ${pid:-none: between restarts}, supervisor pid $sup)"
        kill -TERM "$sup" 2>/dev/null || true
        local deadline=$((SECONDS + STOP_GRACE_S))
        while pid_alive "$sup"; do
            if ((SECONDS >= deadline)); then
                warn "$name still running after ${STOP_GRACE_S}s; sending SIGKILL"
                if pid="$(pidfile_live "$pidfile" "$exe_name")"; then kill -KILL "$pid" 2>/dev/null || true; fi
                # The supervisor exits once its service is gone; if not, it goes too.
                sleep 1
                if pid_alive "$sup"; then kill -KILL "$sup" 2>/dev/null || true; fi
                sleep 0.2
                break
            fi
            sleep 0.2
        done
    fi
    rm -f "$supfile"
    # A service without a (live) supervisor, or one that outlived it.
    if pid="$(pidfile_live "$pidfile" "$exe_name")"; then
        log "stopping $name (pid $pid, no supervisor)"
        terminate_pid "$pid" "$name"
    elif [[ -f "$pidfile" ]]; then
        log "$pidfile names no running $exe_name; removing it"
    fi
    rm -f "$pidfile"
}
