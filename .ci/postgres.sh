#!/usr/bin/env bash
# A throwaway PostgreSQL server for the store tests (tests/serve/test_store.py), independent of any system cluster.
#
#   .ci/postgres.sh [start [DIR]]   installs the Debian `postgresql` package if no server binaries are there, then
#                                   starts a new server with its data, socket and log in DIR (default: a new
#                                   mktemp -d folder; DIR must be absent or empty) and prints ONE line on stdout:
#                                   postgresql+psycopg://USER:PASSWORD@127.0.0.1:PORT/ligero_test
#   .ci/postgres.sh stop DIR        stops that server and deletes DIR (only a DIR this script made)
#
# Every start makes a new server (new folder, new generated password, the first free port from 54329 up) and leaves
# servers from earlier starts alone, so running it twice gives two independent servers; stop each by its DIR.
# It listens on 127.0.0.1 only, with password (scram-sha-256) auth; its unix socket is in DIR (peer auth, for
# this script's own setup as the `postgres` OS user). fsync stays on. Everything but the URL goes to stderr.
# Needs root (apt-get, runuser); PostgreSQL itself runs as the `postgres` user, since it refuses to run as root.
set -euo pipefail

DB_NAME=ligero_test
DB_USER=ligero
FIRST_PORT=54329
MARKER=.ligero-ci-postgres  # a DIR holding this file was made by this script and may be deleted by `stop`

log() { echo "postgres.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

newest_bindir() {  # the bin folder of the newest installed server, or nothing
    local postgres
    postgres=$(ls -d /usr/lib/postgresql/*/bin/postgres 2>/dev/null | sort -V | tail -n 1) || true
    [[ -n $postgres ]] && dirname "$postgres"
    return 0
}

install_server() {
    log "no PostgreSQL server binaries under /usr/lib/postgresql; installing the Debian package postgresql"
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get install -y -q --no-install-recommends postgresql)
    if ! "${apt[@]}" >&2; then
        log "install failed; running apt-get update and trying again"
        apt-get update -q >&2
        "${apt[@]}" >&2
    fi
}

as_postgres() { runuser -u postgres -- "$@"; }

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pg_stop() {  # stop the server whose data folder is $1, if it runs
    local data=$1 bindir
    [[ -f $data/postmaster.pid ]] || return 0
    bindir=/usr/lib/postgresql/$(cat "$data/PG_VERSION")/bin
    as_postgres "$bindir/pg_ctl" -D "$data" -m fast -w -t 60 stop >&2
}

stop() {
    local dir=${1:?usage: $0 stop DIR}
    [[ -d $dir ]] || { log "$dir does not exist: nothing to stop"; return 0; }
    if [[ -z $(ls -A -- "$dir") ]]; then rmdir -- "$dir"; return 0; fi  # a start that failed before it began
    [[ -f $dir/$MARKER ]] || die "$dir was not made by $0; not touching it"
    pg_stop "$dir/data"
    rm -rf -- "$dir"
    log "stopped the server in $dir and deleted it"
}

start() {
    [[ $(id -u) == 0 ]] || die "run as root (it installs packages and runs the server as the postgres user)"
    local bindir
    dir='' made_dir=0  # globals: the EXIT trap below reads them
    bindir=$(newest_bindir)
    if [[ -z $bindir ]]; then
        install_server || die "could not install the postgresql package"
        bindir=$(newest_bindir)
        [[ -n $bindir ]] || die "installed postgresql but found no /usr/lib/postgresql/*/bin/postgres"
    fi
    id postgres >/dev/null 2>&1 || die "the postgresql package is installed but there is no postgres user"

    if [[ -n ${1:-} ]]; then
        dir=$1
        mkdir -p -- "$dir"
        [[ -z $(ls -A -- "$dir") ]] || die "$dir is not empty"
    else
        dir=$(mktemp -d "${TMPDIR:-/tmp}/ligero-pg.XXXXXX")
        made_dir=1
    fi
    dir=$(cd -- "$dir" && pwd -P)
    touch "$dir/$MARKER"
    chown postgres: "$dir"
    chmod 700 "$dir"
    as_postgres test -w "$dir" || die "the postgres user cannot write $dir (is a parent folder closed to it?)"
    cd / # the postgres user may not be able to read the caller's folder
    log "PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') from $bindir; data, socket and log in $dir"

    # If anything below fails: show the server log, stop the server, and delete the folder if we made it.
    trap 'rc=$?; if ((rc != 0)); then
            [[ -f $dir/log ]] && { log "server log:"; tail -n 30 "$dir/log" >&2; }
            pg_stop "$dir/data" || true
            if ((made_dir)); then rm -rf -- "$dir"; fi
          fi' EXIT

    as_postgres "$bindir/initdb" -D "$dir/data" -U postgres -E UTF8 --no-locale --auth-local=peer \
        --auth-host=scram-sha-256 --no-instructions >/dev/null
    cat >>"$dir/data/postgresql.conf" <<EOF
# .ci/postgres.sh: a throwaway server for the tests
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
EOF

    local port=$FIRST_PORT started=0 tries
    for ((tries = 0; tries < 50; tries++, port++)); do
        port_in_use "$port" && continue
        # A server that loses a race for the port fails to start: try the next one.
        if as_postgres "$bindir/pg_ctl" -D "$dir/data" -l "$dir/log" -o "-p $port" -w -t 60 start >/dev/null; then
            started=1
            break
        fi
        log "could not start on port $port; trying the next one"
        pg_stop "$dir/data" || true
    done
    ((started)) || die "could not start the server (see the log above)"
    local ready=0
    for ((tries = 0; tries < 60; tries++)); do
        if "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" -d postgres; then ready=1; break; fi
        sleep 1
    done
    ((ready)) || die "the server on port $port does not answer pg_isready"

    local password
    password=$(od -An -tx1 -N18 /dev/urandom | tr -d ' \n')  # hex: nothing to escape in SQL or the URL
    # Through stdin, so the password is not on a command line.
    as_postgres "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -d postgres >&2 <<EOF
CREATE ROLE $DB_USER LOGIN PASSWORD '$password';
CREATE DATABASE $DB_NAME OWNER $DB_USER;
EOF
    # The URL's way in (TCP, password) works.
    PGPASSWORD=$password "$bindir/psql" -X -q -At -h 127.0.0.1 -p "$port" -U "$DB_USER" -d "$DB_NAME" \
        -c 'SELECT 1' >/dev/null || die "cannot log in as $DB_USER over TCP"

    log "server up on 127.0.0.1:$port; stop it with: $0 stop $dir"
    echo "postgresql+psycopg://$DB_USER:$password@127.0.0.1:$port/$DB_NAME"
}

case ${1:-start} in
    start) start "${2:-}" ;;
    stop) stop "${2:-}" ;;
    *) die "usage: $0 [start [DIR]] | stop DIR" ;;
esac
