#!/usr/bin/env bash
# Make a throwaway Redis server available for the tests and print its URL as the last (and
# only) line on stdout; everything else goes to stderr.
#
# Idempotent: the server lives in a fixed directory (ONWARDS_REDIS_DIR, default
# /tmp/onwards-trio-redis). If a server from an earlier run still answers there, its URL is
# printed again; otherwise a fresh one is started on a free loopback port, with no
# persistence (test data, not data to keep). redis-server is installed with apt-get when
# missing (Debian 12).
#
#   export ONWARDS_TEST_REDIS_URL="$(.ci/redis.sh | tail -n 1)"
#
# Stop it with: redis-cli -p "$(cat /tmp/onwards-trio-redis/port)" shutdown nosave
set -euo pipefail

dir="${ONWARDS_REDIS_DIR:-/tmp/onwards-trio-redis}"

log() { echo "redis.sh: $*" >&2; }

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    log "redis-server not found; installing it with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    apt-get install -y --no-install-recommends redis-server >&2
fi

url_for() { echo "redis://127.0.0.1:$1/0"; }

# A server from an earlier run that still answers: reuse it.
if [ -f "$dir/port" ]; then
    port="$(cat "$dir/port")"
    if [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null || true)" = "PONG" ]; then
        log "reusing the server in $dir"
        url_for "$port"
        exit 0
    fi
    log "the server in $dir does not answer on port $port; starting a new one"
    if [ -f "$dir/redis.pid" ]; then
        kill "$(cat "$dir/redis.pid")" 2>/dev/null || true
    fi
fi

rm -rf "$dir"
mkdir -p "$dir"
chmod 700 "$dir"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" >&2
for _ in $(seq 1 100); do
    if [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null || true)" = "PONG" ]; then
        echo "$port" > "$dir/port"
        log "started a server in $dir"
        url_for "$port"
        exit 0
    fi
    sleep 0.1
done
log "redis-server did not answer on port $port within 10 s"
cat "$dir/redis.log" >&2 || true
exit 1
