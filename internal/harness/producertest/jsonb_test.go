package producertest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-streamer/outbox-streamer/internal/harness/testenv"
	"github.com/outbox-streamer/outbox-streamer/outbox"
)

// jsonbCasesFile holds the outbox module's measured documents (one case a
// line: a length or "reject", a tab, the document); its own tests check the
// measure against the lengths, this one the lengths against PostgreSQL.
const jsonbCasesFile = "../../../outbox/testdata/jsonb.txt"

// rejectedDoc is a document jsonb refuses, before PostgreSQL major since when
// since is not 0 ("reject<N" in jsonbCasesFile).
type rejectedDoc struct {
	doc   string
	since int
}

// readJSONBDocs returns the documents of jsonbCasesFile, those with a length
// and those jsonb rejects.
func readJSONBDocs(t *testing.T) (measured []string, rejected []rejectedDoc) {
	t.Helper()
	f, err := os.Open(jsonbCasesFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Split(line, "\t")
		if len(fields) < 2 {
			t.Fatalf("%s: bad line %q", jsonbCasesFile, line)
		}
		if rest, ok := strings.CutPrefix(fields[0], "reject"); ok {
			d := rejectedDoc{doc: fields[1]}
			if rest != "" {
				since, err := strconv.Atoi(strings.TrimPrefix(rest, "<"))
				if err != nil || !strings.HasPrefix(rest, "<") {
					t.Fatalf("%s: bad line %q: want reject or reject<MAJOR", jsonbCasesFile, line)
				}
				d.since = since
			}
			rejected = append(rejected, d)
		} else {
			measured = append(measured, fields[1])
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if len(measured) == 0 || len(rejected) == 0 {
		t.Fatalf("%s: %d measured and %d rejected documents", jsonbCasesFile, len(measured), len(rejected))
	}
	return measured, rejected
}

// TestJSONBTextLenMatchesPostgres checks the outbox module's measured
// documents and thousands of random ones, built from the constructs whose
// printed length differs from the input, against a real PostgreSQL.
//
// The measure is unexported, so it is read through the size limit: a context
// of n bytes as PostgreSQL prints it passes MaxContextBytes n and fails n-1.
func TestJSONBTextLenMatchesPostgres(t *testing.T) {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, testenv.Postgres(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)

	measured, rejected := readJSONBDocs(t)
	docs := make([]string, 0, 3000)
	docs = append(docs, measured...)
	rng := rand.New(rand.NewPCG(1, 2))
	for len(docs) < cap(docs) {
		docs = append(docs, randomJSON(rng, 0))
	}
	var lens []int
	err = conn.QueryRow(ctx, `SELECT array_agg(octet_length(d::jsonb::text) ORDER BY i)
		FROM unnest($1::text[]) WITH ORDINALITY AS t(d, i)`, docs).Scan(&lens)
	if err != nil {
		t.Fatal(err)
	}
	validate := func(d string, limit int) error {
		return outbox.New(outbox.Options{MaxContextBytes: limit}).
			Validate(outbox.Event{Type: "jsonb", Time: time.Now(), RawContext: json.RawMessage(d)})
	}
	for i, d := range docs {
		if !json.Valid([]byte(d)) {
			t.Fatalf("generated invalid JSON %s", d)
		}
		if err := validate(d, lens[i]); err != nil {
			t.Fatalf("%s, which PostgreSQL prints in %d bytes, fails a limit of %d: %v", d, lens[i], lens[i], err)
		}
		// A limit of 0 means the default; a document of one byte passes a
		// limit of 1, so it is no shorter, and valid JSON is never empty.
		if lens[i] > 1 {
			if err := validate(d, lens[i]-1); !errors.Is(err, outbox.ErrContextTooLarge) {
				t.Fatalf("%s, which PostgreSQL prints in %d bytes, passes a limit of %d (%v)", d, lens[i], lens[i]-1, err)
			}
		}
	}
	var major int
	if err := conn.QueryRow(ctx, "SELECT current_setting('server_version_num')::int / 10000").Scan(&major); err != nil {
		t.Fatal(err)
	}
	for _, r := range rejected {
		_, err := conn.Exec(ctx, "SELECT $1::text::jsonb", r.doc)
		switch accepts := r.since != 0 && major >= r.since; {
		case err == nil && !accepts:
			t.Errorf("PostgreSQL %d accepts %s, which outbox rejects", major, r.doc)
		case err != nil && accepts:
			t.Errorf("PostgreSQL %d rejects %s, which the cases file says it accepts from %d on: %v", major, r.doc, r.since, err)
		}
		if err := validate(r.doc, 0); !errors.Is(err, outbox.ErrInvalidContext) {
			t.Errorf("outbox accepts %s (%v), which PostgreSQL rejects (before %d when not 0)", r.doc, err, r.since)
		}
	}
}

// randomJSON returns a random document that exercises key order, duplicate
// keys, escapes, non-ASCII text, number normalisation and whitespace.
func randomJSON(rng *rand.Rand, depth int) string {
	ws := func() string { return []string{"", "", " ", "\n\t ", "\r\n"}[rng.IntN(5)] }
	kind := rng.IntN(10)
	if depth >= 4 && kind < 4 {
		kind += 4
	}
	switch kind {
	case 0, 1: // object, sometimes with duplicate keys
		n := rng.IntN(5)
		parts := make([]string, n)
		for i := range parts {
			key := randomString(rng, 3)
			parts[i] = ws() + key + ws() + ":" + ws() + randomJSON(rng, depth+1) + ws()
		}
		return "{" + strings.Join(parts, ",") + ws() + "}"
	case 2, 3:
		n := rng.IntN(5)
		parts := make([]string, n)
		for i := range parts {
			parts[i] = ws() + randomJSON(rng, depth+1) + ws()
		}
		return "[" + strings.Join(parts, ",") + ws() + "]"
	case 4, 5:
		return randomString(rng, 12)
	case 6, 7, 8:
		return randomNumber(rng)
	default:
		return []string{"true", "false", "null"}[rng.IntN(3)]
	}
}

// randomString returns a JSON string literal of up to n pieces, each a plain
// character, a non-ASCII one or an escape.
func randomString(rng *rand.Rand, n int) string {
	pieces := []string{
		"a", "b", "Z", "0", " ", "é", "日", "😀", "\x7f",
		`\"`, `\\`, `\/`, `\b`, `\f`, `\n`, `\r`, `\t`,
		`\u0001`, `\u001f`, `\u0020`, `\u0041`, `\u00e9`, `\u007f`, `\u2028`, `\ud83d\ude00`, `\u0022`, `\u005c`,
	}
	var sb strings.Builder
	sb.WriteByte('"')
	for range rng.IntN(n + 1) {
		sb.WriteString(pieces[rng.IntN(len(pieces))])
	}
	sb.WriteByte('"')
	return sb.String()
}

func randomNumber(rng *rand.Rand) string {
	var sb strings.Builder
	if rng.IntN(3) == 0 {
		sb.WriteByte('-')
	}
	if rng.IntN(3) == 0 {
		sb.WriteByte('0')
	} else {
		sb.WriteString(fmt.Sprint(1 + rng.IntN(9)))
		for range rng.IntN(6) {
			sb.WriteString(fmt.Sprint(rng.IntN(10)))
		}
	}
	if rng.IntN(2) == 0 {
		sb.WriteByte('.')
		for range 1 + rng.IntN(6) {
			sb.WriteString(fmt.Sprint([]int{0, 0, 0, 1, 5, 9}[rng.IntN(6)]))
		}
	}
	if rng.IntN(2) == 0 {
		sb.WriteString([]string{"e", "E", "e+", "e-", "E-", "e0"}[rng.IntN(6)])
		sb.WriteString(fmt.Sprint(rng.IntN(40)))
	}
	return sb.String()
}
