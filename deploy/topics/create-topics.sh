#!/bin/sh
#
# deploy/topics/create-topics.sh: create the pipeline's topics with their production settings
# (deploy/topics/README.md says why each value), and align the settings of topics that exist.
# Idempotent: run it at every deploy. The compose file and the Kubernetes topics Job run it in
# the apache/kafka image; anywhere else, put Kafka's bin/ on PATH or set KAFKA_BIN.
#
# Environment (defaults in brackets):
#   KAFKA_BROKERS                bootstrap servers [kafka:9092]
#   KAFKA_COMMAND_CONFIG         client properties file for TLS/SASL (--command-config) [none]
#   KAFKA_BIN                    directory of kafka-topics.sh and kafka-configs.sh
#                                [/opt/kafka/bin if it exists, else PATH]
#   INPUT_TOPIC, LEDGER_TOPIC, DLQ_TOPIC   names, as the services read them
#                                [credits.input, credits.ledger, credits.dlq]
#   TOPIC_PARTITIONS             partitions of the input and ledger topics (the same for both:
#                                the rater writes a fact to the partition its event came from)
#                                [16]
#   DLQ_PARTITIONS               partitions of the dead-letter topic [3]
#   TOPIC_REPLICATION_FACTOR     [3]
#   TOPIC_MIN_INSYNC_REPLICAS    [2] (at most the replication factor)
#   DEDUPE_WINDOW_SECONDS        the services' dedupe window [86400]
#   TOPIC_OUTAGE_SECONDS         the longest outage of a consumer to absorb [604800: 7 days]
#   TOPIC_RETENTION_MS           retention of input and ledger
#                                [(DEDUPE_WINDOW_SECONDS + TOPIC_OUTAGE_SECONDS) * 1000]
#   DLQ_RETENTION_MS             retention of the dead-letter topic [7776000000: 90 days]
#
# Exit status: 0 when every topic exists with its settings and the input and ledger topics
# have the same partition count; non-zero otherwise.

set -eu

KAFKA_BROKERS="${KAFKA_BROKERS:-kafka:9092}"
INPUT_TOPIC="${INPUT_TOPIC:-credits.input}"
LEDGER_TOPIC="${LEDGER_TOPIC:-credits.ledger}"
DLQ_TOPIC="${DLQ_TOPIC:-credits.dlq}"
TOPIC_PARTITIONS="${TOPIC_PARTITIONS:-16}"
DLQ_PARTITIONS="${DLQ_PARTITIONS:-3}"
TOPIC_REPLICATION_FACTOR="${TOPIC_REPLICATION_FACTOR:-3}"
TOPIC_MIN_INSYNC_REPLICAS="${TOPIC_MIN_INSYNC_REPLICAS:-2}"
DEDUPE_WINDOW_SECONDS="${DEDUPE_WINDOW_SECONDS:-86400}"
TOPIC_OUTAGE_SECONDS="${TOPIC_OUTAGE_SECONDS:-604800}"
TOPIC_RETENTION_MS="${TOPIC_RETENTION_MS:-$(((DEDUPE_WINDOW_SECONDS + TOPIC_OUTAGE_SECONDS) * 1000))}"
DLQ_RETENTION_MS="${DLQ_RETENTION_MS:-7776000000}"

if [ -z "${KAFKA_BIN:-}" ] && [ -d /opt/kafka/bin ]; then KAFKA_BIN=/opt/kafka/bin; fi
if [ -n "${KAFKA_BIN:-}" ]; then PATH="$KAFKA_BIN:$PATH"; fi

log() { printf '==> %s\n' "$*"; }
die() {
    printf '==> ERROR: %s\n' "$*" >&2
    exit 1
}

# --- checks before anything is created ---------------------------------------------------------
for v in TOPIC_PARTITIONS DLQ_PARTITIONS TOPIC_REPLICATION_FACTOR TOPIC_MIN_INSYNC_REPLICAS \
    DEDUPE_WINDOW_SECONDS TOPIC_OUTAGE_SECONDS TOPIC_RETENTION_MS DLQ_RETENTION_MS; do
    val=""
    eval "val=\${$v}"
    case "$val" in
        '' | *[!0-9]*) die "$v=$val is not a positive integer" ;;
    esac
    [ "$val" -gt 0 ] || die "$v must be positive"
done
[ "$TOPIC_MIN_INSYNC_REPLICAS" -le "$TOPIC_REPLICATION_FACTOR" ] ||
    die "TOPIC_MIN_INSYNC_REPLICAS=$TOPIC_MIN_INSYNC_REPLICAS exceeds TOPIC_REPLICATION_FACTOR=$TOPIC_REPLICATION_FACTOR: every acks=all produce would fail"
# A redelivery older than the dedupe window is no longer caught by Redis; an outage longer than
# the retention loses messages. Retention must cover both.
[ "$TOPIC_RETENTION_MS" -gt "$((DEDUPE_WINDOW_SECONDS * 1000))" ] ||
    die "TOPIC_RETENTION_MS=$TOPIC_RETENTION_MS is not longer than the dedupe window (${DEDUPE_WINDOW_SECONDS}s)"
command -v kafka-topics.sh >/dev/null 2>&1 || die "kafka-topics.sh is not on PATH (set KAFKA_BIN)"

set -- --bootstrap-server "$KAFKA_BROKERS"
if [ -n "${KAFKA_COMMAND_CONFIG:-}" ]; then set -- "$@" --command-config "$KAFKA_COMMAND_CONFIG"; fi

# Settings shared by all three topics. compression.type=producer keeps what the producers chose
# (KAFKA_COMPRESSION, lz4 by default) instead of recompressing on the broker.
COMMON="cleanup.policy=delete,compression.type=producer,min.insync.replicas=$TOPIC_MIN_INSYNC_REPLICAS"

# ensure_topic NAME PARTITIONS RETENTION_MS ARGS...: ARGS are the connection flags.
ensure_topic() {
    name="$1" partitions="$2" retention="$3"
    shift 3
    configs="$COMMON,retention.ms=$retention"
    log "topic $name: $partitions partitions, replication $TOPIC_REPLICATION_FACTOR, $configs"
    # --config once per setting: kafka-topics.sh takes one KEY=VALUE per flag.
    # shellcheck disable=SC2046  # split the settings into words on purpose
    kafka-topics.sh "$@" --create --if-not-exists --topic "$name" \
        --partitions "$partitions" --replication-factor "$TOPIC_REPLICATION_FACTOR" \
        $(printf '%s\n' "$configs" | tr ',' '\n' | sed 's/^/--config /')
    # A topic that existed keeps its partitions and replicas, but takes the settings.
    kafka-configs.sh "$@" --alter --entity-type topics --entity-name "$name" --add-config "$configs"
}

# partitions_of NAME ARGS...: the partition count the broker reports.
partitions_of() {
    topic="$1"
    shift
    kafka-topics.sh "$@" --describe --topic "$topic" |
        sed -n 's/.*PartitionCount:[[:space:]]*\([0-9][0-9]*\).*/\1/p' | head -n 1
}

ensure_topic "$INPUT_TOPIC" "$TOPIC_PARTITIONS" "$TOPIC_RETENTION_MS" "$@"
ensure_topic "$LEDGER_TOPIC" "$TOPIC_PARTITIONS" "$TOPIC_RETENTION_MS" "$@"
ensure_topic "$DLQ_TOPIC" "$DLQ_PARTITIONS" "$DLQ_RETENTION_MS" "$@"

# --- the one hard rule: input and ledger have the same partition count ------------------------
have_input="$(partitions_of "$INPUT_TOPIC" "$@")"
have_ledger="$(partitions_of "$LEDGER_TOPIC" "$@")"
if [ -z "$have_input" ] || [ -z "$have_ledger" ]; then die "could not read the partition counts back"; fi
[ "$have_input" = "$have_ledger" ] ||
    die "$INPUT_TOPIC has $have_input partitions and $LEDGER_TOPIC $have_ledger: they must be equal (deploy/topics/README.md)"
if [ "$have_input" != "$TOPIC_PARTITIONS" ]; then
    log "WARNING: $INPUT_TOPIC and $LEDGER_TOPIC have $have_input partitions, not TOPIC_PARTITIONS=$TOPIC_PARTITIONS (left as they are)"
fi
log "topics ready: $INPUT_TOPIC and $LEDGER_TOPIC ($have_input partitions each), $DLQ_TOPIC"
