# outbox-streamer — the targets operators of the earlier service know, and a few more.
# `make test` and `make run` need no Docker: they install what is missing (as root on
# Debian) and start PostgreSQL and ClickHouse as local processes on free loopback ports.

GO      ?= go
BIN     := bin
DEVENV  := $(BIN)/outbox-devenv
STREAMER := $(BIN)/outbox-streamer
TEST_TIMEOUT ?= 30m

.PHONY: all build deps deps-run install run test test-pg-compat test-unit fuzz lint migrate reset-test-db bench clean help

all: build

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 18

VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)

build: ## build bin/outbox-streamer (and the local-services launcher bin/outbox-devenv)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-X main.version=$(VERSION)" -o $(STREAMER) ./cmd/outbox-streamer
	CGO_ENABLED=0 $(GO) build -trimpath -o $(DEVENV) ./cmd/outbox-devenv

deps: ## install what make test needs if missing: PostgreSQL, ClickHouse 18.16, the ClickHouse 26.7 library, promtool, ZooKeeper, helm
	./scripts/install-deps.sh

deps-run: ## install only what make run needs if missing: PostgreSQL and the ClickHouse 26.7 library
	./scripts/install-deps.sh run

install: deps build ## deps + build

run: deps-run build ## local PostgreSQL + ClickHouse 26.7, migrate, stream, and a demo producer with progress
	$(DEVENV) -- ./scripts/demo.sh

# The suite's PostgreSQL looks like an old production database of the newest
# major: PostgreSQL 18, xid epoch 1, and the 32-bit xid counter wraps early in
# the run (OUTBOX_PG_XID_EPOCH=0 OUTBOX_PG_NEXT_XID=0 for a fresh cluster;
# TEST_PG_MAJOR=15 for Debian's own).
TEST_PG_MAJOR ?= 18
test: export OUTBOX_PG_XID_EPOCH ?= 1
test: export OUTBOX_PG_NEXT_XID ?= 4294947296

test: deps build ## the whole suite (unit, integration, end to end) on ClickHouse 26.7 and 18.16 and an old PostgreSQL 18 cluster, then test-pg-compat
	cd outbox && $(GO) test -count=1 $(TESTFLAGS) ./...
	OUTBOX_TEST_REQUIRE_LEGACY=1 $(DEVENV) --legacy --pg-version $(TEST_PG_MAJOR) -- $(GO) test -count=1 -timeout $(TEST_TIMEOUT) $(TESTFLAGS) ./...
	$(MAKE) --no-print-directory test-pg-compat

# The PostgreSQL majors besides the main run's that test-pg-compat runs on, and
# what it runs: exactly-once end to end, protocol 2 with and without staging
# (skipped on 13, which has no protocol 2), backfill, the partitioned outbox,
# verify, a crash and restart of the binary, a lost slot, the physical standby,
# failover slots and a primary failover. The majors with a pg_resetwal
# (PG_COMPAT_AGED: Debian's 15, 17 from scripts/fetch-pg-resetwal.sh) are aged
# like the main run's; 13, 14 and 16 are fresh (no Debian suite ships them any
# more). ClickHouse 26.7 only: the main run covers 18.16, which does not depend
# on the PostgreSQL major. The golden pgoutput sessions of every major are
# checked in the main run (replication/testdata/pgoutput/pg<major>).
PG_COMPAT_MAJORS ?= 13 14 15 16 17
PG_COMPAT_AGED ?= 15 17
PG_COMPAT_PKGS := ./replication ./internal/pipeline ./internal/sweep ./internal/verify ./internal/harness/localsvc ./cmd/outbox-streamer
PG_COMPAT_RUN := ^(TestStreamDeliversExactlyTheCommittedEvents|TestRestartMidTransactionIsExactlyOnce|TestStreamingInProgressTransactions|TestStagedStreamedTransactions|TestStagingOfAnAbortedTransactionIsClearedAtSessionStart|TestStagingClearedWhenTheSameProcessReconnects|TestPartitionedOutbox|TestRowsOlderThanTheSlotAreBackfilled|TestBackfillUpdatesEachRowOnce|TestInterruptedBackfillIsRescuedOnce|TestCleanAfterStreaming|TestMissingRowReportedAndRepaired|TestSIGTERMMidStreamThenRestartLosesNothing|TestInvalidatedSlotIsRecreatedAndBackfilled|TestPhysicalStandby.*|TestFailoverSlot|TestPrimaryFailoverExactlyOnce|TestStandbyHold.*|TestWaitForStandbyConfirmationIsReported)$$

test-pg-compat: deps build ## the compatibility subset on PostgreSQL 13, 14, 15, 16 and 17 (PG_COMPAT_MAJORS)
	@set -e; for m in $(PG_COMPAT_MAJORS); do \
		epoch=0; next=0; \
		case " $(PG_COMPAT_AGED) " in *" $$m "*) epoch=1; next=4294947296;; esac; \
		echo "test-pg-compat: PostgreSQL $$m (xid epoch $$epoch)"; \
		OUTBOX_PG_XID_EPOCH=$$epoch OUTBOX_PG_NEXT_XID=$$next OUTBOX_TEST_CH_MODERN_ONLY=1 $(DEVENV) --pg-version $$m -- $(GO) test -count=1 -timeout $(TEST_TIMEOUT) $(TESTFLAGS) -run '$(PG_COMPAT_RUN)' $(PG_COMPAT_PKGS); \
	done

test-unit: ## unit tests only (no servers)
	$(GO) test -count=1 -short ./internal/batch/... ./checkpoint/... ./internal/config/... ./replication/... ./internal/retry/...
	cd outbox && $(GO) test -count=1 -short ./...

fuzz: ## fuzz the pgoutput decoder for a minute
	$(GO) test ./replication -run '^$$' -fuzz FuzzDecode -fuzztime 60s

bench: deps build ## benchmark against a bare slot reader and the polling design: one table (BENCHFLAGS='--reps 1 --rows 50000' for a quick run, --json FILE, --profile DIR)
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/outbox-bench ./cmd/outbox-bench
	$(BIN)/outbox-bench --streamer $(STREAMER) $(BENCHFLAGS)

lint: ## gofmt and go vet
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	cd outbox && $(GO) vet ./...

migrate: build ## apply migrations to the databases named by the environment (DATABASE_URL, CLICKHOUSE_*)
	$(STREAMER) migrate up

reset-test-db: ## remove leftovers of interrupted test runs (data dirs of local servers)
	rm -rf "$${TMPDIR:-/tmp}"/outbox-localsvc-*

clean: ## remove build output
	rm -rf $(BIN)
