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

# start_service NAME [ARGS...]: run $ROOT/target/release/NAME ARGS in the
# background (own session, nohup) with the environment of $STACK_ENV; log to
# $STACK_DIR/NAME.log (the previous one is kept as NAME.log.1), pid to
# $STACK_DIR/NAME.pid. If the pid file names a live NAME process running the
# current binary, it is left running. If it runs a binary that has since been
# rebuilt, it is stopped and started again.
start_service() {
    # NAME may carry an instance suffix (ledger-writer@2): the binary is NAME without it.
    local name="$1"
    shift
    local exe_name="${name%@*}"
    local bin="$RELEASE_DIR/$exe_name"
    local pidfile="$STACK_DIR/$name.pid" logfile="$STACK_DIR/$name.log" pid exe

    [[ -x "$bin" ]] || die "$bin is missing: build first (cargo build --release --workspace --bins)"
    [[ -f "$STACK_ENV" ]] || die "$STACK_ENV is missing (deploy/local/up writes it)"

    if pid="$(pidfile_live "$pidfile" "$exe_name")"; then
        exe="$(pid_exe "$pid")"
        if [[ "$exe" == "$(readlink -f "$bin")" ]]; then
            log "$name is already running (pid $pid)"
            return 0
        fi
        log "$name (pid $pid) runs an older build; restarting it"
        stop_pidfile "$pidfile" "$exe_name"
    fi

    rm -f "$pidfile"
    if [[ -f "$logfile" ]]; then mv -f "$logfile" "$logfile.1"; fi
    (
        set -a
        # shellcheck source=/dev/null
        source "$STACK_ENV"
        set +a
        cd "$ROOT" || exit 1
        # shellcheck disable=SC2016  # expanded by the inner bash
        exec setsid bash -c 'echo $$ >"$0"; exec nohup "$@"' "$pidfile" "$bin" "$@"
    ) >"$logfile" 2>&1 </dev/null &

    # Wait for the child to write its pid file.
    local deadline=$((SECONDS + 5))
    until [[ -s "$pidfile" ]]; do
        ((SECONDS < deadline)) || die "$name did not write $pidfile"
        sleep 0.1
    done
    log "started $name (pid $(read_pidfile "$pidfile"), log $logfile)"
}

# wait_service_ready NAME URL [TIMEOUT_S]: wait until URL answers 2xx while
# the process in $STACK_DIR/NAME.pid stays alive (default 60 s). On failure,
# including the process exiting early, prints the tail of NAME.log and
# returns 1.
wait_service_ready() {
    local name="$1" url="$2" timeout_s="${3:-60}"
    local pidfile="$STACK_DIR/$name.pid" logfile="$STACK_DIR/$name.log"
    local deadline=$((SECONDS + timeout_s))
    while :; do
        if ! pidfile_live "$pidfile" "${name%@*}" >/dev/null; then
            show_log "$logfile"
            fail "$name exited before it was ready"
            return 1
        fi
        if curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; then
            # Still ours? (A leftover process may hold the port while ours
            # failed to bind and exited.)
            sleep 0.2
            if pidfile_live "$pidfile" "${name%@*}" >/dev/null; then
                return 0
            fi
            continue
        fi
        if ((SECONDS >= deadline)); then
            show_log "$logfile"
            fail "$name: $url did not answer 2xx within ${timeout_s}s"
            return 1
        fi
        sleep 0.5
    done
}

# stop_pidfile FILE [NAME]: stop the process FILE names (SIGTERM, up to 15 s,
# then SIGKILL) and remove FILE. Only a live process whose executable is called
# NAME (default: FILE's name without .pid) is signalled; a stale pid file is
# just removed.
stop_pidfile() {
    local file="$1" name="${2:-$(basename "$1" .pid)}" pid
    [[ -f "$file" ]] || return 0
    if ! pid="$(pidfile_live "$file" "$name")"; then
        log "$file names no running $name; removing it"
        rm -f "$file"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 15))
    while pid_alive "$pid"; do
        if ((SECONDS >= deadline)); then
            warn "$name (pid $pid) still running after 15s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    rm -f "$file"
}
