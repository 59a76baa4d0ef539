#!/usr/bin/env bash
# Make a throwaway PostgreSQL server available for the tests and print its DSN as the last
# (and only) line on stdout; everything else goes to stderr.
#
# Idempotent: the cluster lives in a fixed directory (ONWARDS_PG_DIR, default
# /tmp/onwards-trio-pg). If a server from an earlier run is still up there, its DSN is printed
# again; otherwise the directory is wiped and a fresh cluster is initialised and started on a
# free loopback port, with its unix socket in the same directory (nothing in /var/run). Trust
# auth on 127.0.0.1 only, fsync off: test data, not data to keep.
#
#   export ONWARDS_TEST_POSTGRES_DSN="$(.ci/postgres.sh | tail -n 1)"
#
# Stop it with (as root): runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D /tmp/onwards-trio-pg/data stop
set -euo pipefail

dir="${ONWARDS_PG_DIR:-/tmp/onwards-trio-pg}"
db="onwards_test"

log() { echo "postgres.sh: $*" >&2; }

find_bindir() {
    local d
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
        echo "$d"
    elif command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
    fi
}

bindir="$(find_bindir)"
if [ -z "$bindir" ]; then
    log "PostgreSQL not found; installing it with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    apt-get install -y --no-install-recommends postgresql >&2
    bindir="$(find_bindir)"
    if [ -z "$bindir" ]; then
        log "no initdb/pg_ctl after installing postgresql"
        exit 1
    fi
fi

# The server refuses to run as root: as root, run it as the 'postgres' user.
if [ "$(id -u)" -eq 0 ]; then
    as_pg() { runuser -u postgres -- "$@"; }
else
    as_pg() { "$@"; }
fi

dsn_for() { echo "postgresql://postgres@127.0.0.1:$1/$db"; }

ensure_db() {
    local port="$1"
    if [ "$(as_pg "$bindir/psql" -h "$dir" -p "$port" -U postgres -d postgres -tAq \
        -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" != "1" ]; then
        as_pg "$bindir/createdb" -h "$dir" -p "$port" -U postgres "$db" >&2
    fi
}

# A server from an earlier run that is still up: reuse it.
if [ -f "$dir/port" ] && [ -d "$dir/data" ] \
    && as_pg "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    port="$(cat "$dir/port")"
    if as_pg "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" -t 10; then
        ensure_db "$port"
        log "reusing the server in $dir"
        dsn_for "$port"
        exit 0
    fi
    log "the server in $dir does not answer on port $port; stopping it"
    as_pg "$bindir/pg_ctl" -D "$dir/data" -m immediate -w -t 10 stop >&2 || true
fi

# A fresh cluster.
rm -rf "$dir"
mkdir -p "$dir"
if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$dir"
fi
chmod 700 "$dir"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
as_pg "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
    --no-sync >&2
# The port is free when picked but may be taken before the server binds it: try a few.
started=""
for _ in 1 2 3; do
    port="$(free_port)"
    if as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        start >&2; then
        started=1
        break
    fi
done
if [ -z "$started" ]; then
    cat "$dir/server.log" >&2
    exit 1
fi
as_pg sh -c "echo '$port' > '$dir/port'"
ensure_db "$port"
log "started a server in $dir"
dsn_for "$port"
