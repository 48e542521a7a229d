#!/usr/bin/env bash
# The `make run` demo, run inside outbox-devenv (which exports DATABASE_URL and
# CLICKHOUSE_*): migrate both databases, start the streamer, produce demo events and
# print a progress line per second until Ctrl-C (or DEMO_DURATION, e.g. 30s).
set -euo pipefail
cd "$(dirname "$0")/.."
export CLICKHOUSE_SCHEMA="${CLICKHOUSE_SCHEMA:-outbox}"
# Another program may hold the default metrics port: take a free one (the streamer
# logs which) unless one was chosen.
export METRICS_ADDR="${METRICS_ADDR:-127.0.0.1:0}"
# The log goes to a file a person reads (tail -f): readable lines, and the
# leader's progress line more often than in production.
export LOG_FORMAT="${LOG_FORMAT:-console}"
export PROGRESS_INTERVAL="${PROGRESS_INTERVAL:-5s}"
bin=bin/outbox-streamer
log="${TMPDIR:-/tmp}/outbox-streamer-demo.log"

"$bin" migrate up
"$bin" run >"$log" 2>&1 &
streamer=$!
stop() {
	kill -TERM "$streamer" 2>/dev/null || true
	wait "$streamer" 2>/dev/null || true
}
trap stop EXIT
echo "streamer running (pid $streamer, logs in $log); producing demo events, Ctrl-C to stop"
args=(--rate "${DEMO_RATE:-500}" --tx-size 10)
if [ -n "${DEMO_DURATION:-}" ]; then args+=(--duration "$DEMO_DURATION"); fi
"$bin" demo "${args[@]}" || true
stop
trap - EXIT
echo
"$bin" status
