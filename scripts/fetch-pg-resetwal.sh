#!/usr/bin/env bash
# Fetches pg_resetwal for the PostgreSQL majors whose packaged server binaries
# lack it (internal/harness/localsvc/pg-resetwal.txt), so the harness can age
# those clusters like old production databases. Debian 12 has only
# PostgreSQL 15; newer Debian suites have the newer majors, built against a
# newer C library, so each tool is kept with that library and started through
# its dynamic loader:
#
#   <cache>/resetwal/<major>/pg_resetwal        a wrapper: the loader, the library path, the binary
#   <cache>/resetwal/<major>/bin/pg_resetwal    the binary from postgresql-<major>
#   <cache>/resetwal/<major>/lib/               ld-linux-x86-64.so.2 and libc.so.6
#
# Usage: fetch-pg-resetwal.sh CACHE_DIR [MAJOR ...]   (default: every major in the pin file)
set -euo pipefail
cd "$(dirname "$0")/.."

cache="$1"
shift
pins=internal/harness/localsvc/pg-resetwal.txt
mirror="${OUTBOX_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
majors=("$@")
if [ "${#majors[@]}" -eq 0 ]; then
	mapfile -t majors < <(awk '$1 ~ /^[0-9]+$/ { print $1 }' "$pins")
fi

step() { printf 'fetch-pg-resetwal: %s\n' "$*"; }
get() { # url file
	if command -v curl >/dev/null 2>&1; then curl -fsSL -o "$2" "$1"; else wget -q -O "$2" "$1"; fi
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# fetch_deb SUITE PACKAGE POOLDIR VERSION OUT: the pinned version from the pool,
# else the one the suite's index names today (a mirror keeps only current ones).
fetch_deb() {
	local suite="$1" pkg="$2" pooldir="$3" version="$4" out="$5"
	if get "$mirror/pool/main/$pooldir/${pkg}_${version}_amd64.deb" "$out" 2>/dev/null; then
		return
	fi
	local index="$tmp/Packages-$suite"
	if [ ! -s "$index" ]; then
		get "$mirror/dists/$suite/main/binary-amd64/Packages.xz" "$index.xz"
		xz -d "$index.xz"
	fi
	local file
	file="$(awk -v p="$pkg" '$1 == "Package:" { cur = $2 } $1 == "Filename:" && cur == p { print $2; exit }' "$index")"
	if [ -z "$file" ]; then
		step "Debian $suite has no $pkg"
		exit 1
	fi
	step "$pkg $version is gone from the mirror; using $file"
	get "$mirror/$file" "$out"
}

read -r _ libc_suite libc_version < <(awk '$1 == "libc6"' "$pins")
libc_deb="$tmp/libc6.deb"
for m in "${majors[@]}"; do
	dest="$cache/resetwal/$m"
	[ -e "$dest/.complete" ] && continue
	read -r _ suite version < <(awk -v m="$m" '$1 == m' "$pins") || { step "no pin for PostgreSQL $m in $pins"; exit 1; }
	step "PostgreSQL $m: pg_resetwal from Debian $suite's postgresql-$m (about 8 MB) into $dest"
	[ -s "$libc_deb" ] || fetch_deb "$libc_suite" libc6 g/glibc "$libc_version" "$libc_deb"
	fetch_deb "$suite" "postgresql-$m" "p/postgresql-$m" "$version" "$tmp/pg$m.deb"
	rm -rf "$tmp/x" && mkdir -p "$tmp/x"
	dpkg-deb -x "$tmp/pg$m.deb" "$tmp/x"
	dpkg-deb -x "$libc_deb" "$tmp/x"
	rm -rf "$dest" && mkdir -p "$dest/bin" "$dest/lib"
	cp "$tmp/x/usr/lib/postgresql/$m/bin/pg_resetwal" "$dest/bin/"
	cp -L "$tmp/x/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$tmp/x/usr/lib/x86_64-linux-gnu/libc.so.6" "$dest/lib/"
	cat >"$dest/pg_resetwal" <<'WRAP'
#!/bin/sh
d="$(dirname "$0")"
exec "$d/lib/ld-linux-x86-64.so.2" --library-path "$d/lib" "$d/bin/pg_resetwal" "$@"
WRAP
	chmod -R a+rX "$cache/resetwal"
	chmod 755 "$dest/pg_resetwal"
	"$dest/pg_resetwal" --version >/dev/null
	touch "$dest/.complete"
	step "PostgreSQL $m: $("$dest/pg_resetwal" --version)"
done
