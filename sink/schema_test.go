package sink

import (
	"strings"
	"testing"
)

func TestColumnDifferences(t *testing.T) {
	modern := map[string]string{
		"event_id": "UInt64", "event_type": "LowCardinality(String)", "event_date_time": "DateTime64(6, 'UTC')",
		"environment": "LowCardinality(String)", "event_context": "String", "metadata_version": "Int64",
		"created_at": "DateTime64(6, 'UTC')", "commit_lsn": "UInt64", "inserted_at": "DateTime64(6, 'UTC')",
	}
	legacy := map[string]string{
		"event_id": "UInt64", "event_type": "String", "event_date_time": "DateTime('UTC')",
		"environment": "Nullable(String)", "event_context": "JSON", "metadata_version": "Int64",
		"created_at": "DateTime", "commit_lsn": "UInt64",
	}
	celery := map[string]string{
		"id": "UInt64", "event_type": "String", "event_date_time": "DateTime", "environment": "String",
		"event_context": "String", "metadata_version": "UInt64", "created_at": "DateTime",
	}
	cases := []struct {
		name string
		have map[string]string
		want []string
	}{
		{"modern", modern, nil},
		{"legacy and wrapped", legacy, nil},
		{"earlier service", celery, []string{"missing event_id UInt64", "metadata_version is UInt64, want Int64", "missing commit_lsn UInt64"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := columnDifferences(c.have)
			if strings.Join(got, "|") != strings.Join(c.want, "|") {
				t.Fatalf("differences %q, want %q", got, c.want)
			}
		})
	}
}

func TestTypeFamily(t *testing.T) {
	for typ, want := range map[string]string{
		"LowCardinality(Nullable(String))": "String",
		"DateTime64(6, 'UTC')":             "DateTime64",
		"UInt64":                           "UInt64",
		"Nullable(DateTime('UTC'))":        "DateTime",
	} {
		if got := typeFamily(typ); got != want {
			t.Errorf("typeFamily(%q) = %q, want %q", typ, got, want)
		}
	}
}
