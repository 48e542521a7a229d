#!/bin/bash
# Cost of retention: a 1,000,000-row partition dropped whole vs 1,000,000 rows
# pruned one by one, with a producer inserting meanwhile. Run under the local
# servers: make build && bin/outbox-devenv -- scripts/measure-retention.sh
set -e
B="$(dirname "$0")/../bin/outbox-streamer"
base="$DATABASE_URL"
for layout in partitioned plain; do
  db="m_$layout"
  psql -q "$base" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
  url="${base%/*}/$db?sslmode=disable"
  export DATABASE_URL="$url" CLICKHOUSE_SCHEMA="m_$layout"
  if [ $layout = partitioned ]; then export OUTBOX_PARTITION_INTERVAL=1d; else unset OUTBOX_PARTITION_INTERVAL; fi
  $B migrate up >/dev/null
  if [ $layout = partitioned ]; then
    psql -q "$url" -c "CREATE TABLE event_outbox_old PARTITION OF event_outbox FOR VALUES FROM ('2026-11-20') TO ('2026-11-21')"
  fi
  psql -q "$url" -c "INSERT INTO event_outbox (event_type, event_date_time, event_context, status, created_at)
     SELECT 'order.paid', timestamp '2026-11-20 12:00', jsonb_build_object('n', g, 'note', 'event ' || g), 'processed', timestamp '2026-11-20 12:00'
     FROM generate_series(1, 1000000) g" -c "VACUUM ANALYZE event_outbox"
  size=$(psql -tA "$url" -c "SELECT pg_size_pretty(pg_total_relation_size('event_outbox') + coalesce((SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits WHERE inhparent = 'event_outbox'::regclass), 0))")
  # A producer inserting one row every 10 ms during the pass, its worst insert time.
  ( for i in $(seq 1 400); do psql -qtA "$url" -c "\timing on" -c "INSERT INTO event_outbox (event_type, event_date_time) VALUES ('live', now() AT TIME ZONE 'UTC')" 2>&1 | grep -o 'Time: [0-9.]*' ; sleep 0.01; done ) > "${TMPDIR:-/tmp}"/prod-$layout.txt &
  pp=$!
  sleep 0.5
  start=$(date +%s.%N)
  out=$($B prune --older-than 2d 2>/dev/null)
  end=$(date +%s.%N)
  wait $pp
  worst=$(awk '{print $2}' "${TMPDIR:-/tmp}"/prod-$layout.txt | sort -n | tail -1)
  p50=$(awk '{print $2}' "${TMPDIR:-/tmp}"/prod-$layout.txt | sort -n | awk '{a[NR]=$1} END {print a[int(NR/2)]}')
  echo "$layout: 1,000,000 processed rows ($size): prune took $(awk "BEGIN {printf \"%.2f\", $end - $start}") s; producer single-row INSERT during it: p50 ${p50} ms, worst ${worst} ms; $out"
done
