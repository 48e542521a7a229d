package sink

import (
	"testing"

	"github.com/ClickHouse/clickhouse-go/v2"
)

// TestCompressionSetting: CLICKHOUSE_COMPRESSION decides whether native
// inserts are LZ4-compressed; HTTP never asks for compression.
func TestCompressionSetting(t *testing.T) {
	for _, c := range []struct {
		protocol, compression string
		want                  bool
	}{
		{"native", "", true}, {"native", CompressionLZ4, true}, {"native", CompressionNone, false},
		{"http", CompressionLZ4, false}, {"http", CompressionNone, false},
	} {
		cfg := Config{Addr: "localhost:9000", Protocol: c.protocol, Compression: c.compression}
		if err := cfg.Validate(); err != nil {
			t.Fatal(err)
		}
		opts := connectOptions(cfg)
		if got := opts.Compression != nil && opts.Compression.Method == clickhouse.CompressionLZ4; got != c.want {
			t.Errorf("%s, %q: LZ4 %v, want %v", c.protocol, c.compression, got, c.want)
		}
	}
	cfg := Config{Addr: "localhost:9000", Compression: "zstd"}
	if err := cfg.Validate(); err == nil {
		t.Error("CLICKHOUSE_COMPRESSION zstd accepted")
	}
}
