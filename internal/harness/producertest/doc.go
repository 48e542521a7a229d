// Package producertest holds the tests of the producer module
// (github.com/outbox-streamer/outbox-streamer/outbox) that need the streamer:
// its test servers, migrations and pipeline. They live in the streamer's
// module so that the producer module depends on pgx alone; the outbox
// module keeps its unit tests and examples. The package has no code.
package producertest
