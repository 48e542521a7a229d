package outbox

import (
	"bufio"
	"encoding/json"
	"os"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"
)

// jsonbCase is a line of testdata/jsonb.txt: a document and the length of
// the text PostgreSQL prints for it as jsonb, or reject for valid JSON that
// jsonb refuses. The file is shared with the streamer module's tests, which
// check every case against a real PostgreSQL.
type jsonbCase struct {
	in     string
	want   int
	reject bool
}

func readJSONBCases(t testing.TB) []jsonbCase {
	t.Helper()
	f, err := os.Open("testdata/jsonb.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var cases []jsonbCase
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for line := 1; sc.Scan(); line++ {
		text := sc.Text()
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		fields := strings.Split(text, "\t")
		if len(fields) < 2 {
			t.Fatalf("testdata/jsonb.txt:%d: want a length or reject, a tab and a document", line)
		}
		c := jsonbCase{in: fields[1], reject: strings.HasPrefix(fields[0], "reject")}
		if !c.reject {
			if c.want, err = strconv.Atoi(fields[0]); err != nil {
				t.Fatalf("testdata/jsonb.txt:%d: %v", line, err)
			}
		}
		cases = append(cases, c)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return cases
}

func TestJSONBTextLen(t *testing.T) {
	cases := readJSONBCases(t)
	if len(cases) < 40 {
		t.Fatalf("only %d cases in testdata/jsonb.txt", len(cases))
	}
	for _, c := range cases {
		if !json.Valid([]byte(c.in)) {
			t.Fatalf("test case %s is not valid JSON", c.in)
		}
		got, err := jsonbTextLen([]byte(c.in))
		switch {
		case c.reject && err == nil:
			t.Errorf("jsonbTextLen(%s) accepted it; PostgreSQL does not", c.in)
		case !c.reject && (err != nil || got != c.want):
			t.Errorf("jsonbTextLen(%s) = %d, %v; want %d", c.in, got, err, c.want)
		}
	}
}

// FuzzJSONBTextLen: any valid JSON is measured without a panic, and a
// document that is accepted has a positive length.
func FuzzJSONBTextLen(f *testing.F) {
	for _, c := range readJSONBCases(f) {
		f.Add([]byte(c.in))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if !json.Valid(b) || !utf8.Valid(b) {
			return
		}
		n, err := jsonbTextLen(b)
		if err == nil && n <= 0 {
			t.Fatalf("jsonbTextLen(%q) = %d", b, n)
		}
	})
}
