#!/bin/bash
# Bytes the streamer allocates per delivered row, its GC cycles and CPU, for
# two binaries alternately on the same kind of backlog (200,000 rows committed
# behind an existing slot, drained by `run`, read from its /metrics). A
# one-off measurement for the performance notes, not a test:
#
#   make build && cp bin/outbox-streamer /tmp/a   # ... and another build as /tmp/b
#   bin/outbox-devenv -- scripts/measure-streamer-alloc.sh /tmp/a /tmp/b [rounds]
set -euo pipefail
a=$1 b=$2 rounds=${3:-3} rows=200000
"$a" migrate up >/dev/null
pending() { psql "$DATABASE_URL" -Atc "SELECT count(*) FROM event_outbox WHERE status <> 'processed'"; }
backlog() {
	psql "$DATABASE_URL" -qAtc "INSERT INTO event_outbox (event_type, event_date_time, environment, event_context)
		SELECT 'order.created', now() AT TIME ZONE 'UTC', 'bench', jsonb_build_object('user_id', g, 'amount', g % 997, 'note', repeat('x', 40))
		FROM generate_series(1, $rows) g" >/dev/null
}
drain() { # binary label
	local port=$((18000 + RANDOM % 1000)) m pid
	METRICS_ADDR=127.0.0.1:$port LOG_LEVEL=warn "$1" run >/dev/null 2>&1 &
	pid=$!
	sleep 3
	while [ "$(pending)" != "0" ]; do sleep 0.2; done
	m=$(curl -s "127.0.0.1:$port/metrics")
	kill -TERM "$pid"
	wait "$pid" || true
	echo "$m" | awk -v name="$2" -v rows=$rows '/^go_memstats_alloc_bytes_total /{a=$2} /^go_gc_duration_seconds_count /{g=$2} /^process_cpu_seconds_total /{c=$2}
		END {printf "%-40s %6.0f B/row allocated, %3d GC cycles, %.2f µs CPU/row (start included)\n", name, a/rows, g, c*1e6/rows}'
}
drain "$a" "slot created" >/dev/null # the first start creates the slot on the empty table
for _ in $(seq "$rounds"); do
	backlog; drain "$a" "$a"
	backlog; drain "$b" "$b"
done
