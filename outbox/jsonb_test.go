package outbox

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-streamer/outbox-streamer/internal/testenv"
)

// Lengths as PostgreSQL 15 prints these documents (SELECT
// octet_length(x::jsonb::text)), and the text it prints where it helps.
var jsonbCases = []struct {
	in   string
	want int
}{
	{`{"a":1,"b":[1,2,{}],"c":[]}`, 34},    // {"a": 1, "b": [1, 2, {}], "c": []}
	{`-0`, 1},                              // 0
	{`-0.0`, 3},                            // 0.0
	{`0.00e1`, 3},                          // 0.0
	{`0e5`, 1},                             // 0
	{`1e2`, 3},                             // 100
	{`1.50e1`, 4},                          // 15.0
	{`1E-2`, 4},                            // 0.01
	{`-1.5e-3`, 7},                         // -0.0015
	{`12.3400`, 7},                         // 12.3400
	{`{"b":1,"a":2,"b":3}`, 16},            // {"a": 2, "b": 3}
	{`"\u00e9\/\u001f\u007f\n\t\"\\"`, 20}, // "é/\u001f<DEL>\n\t\"\\"
	{`"\ud83d\ude00"`, 6},                  // "😀"
	{`123e-1`, 4},                          // 12.3
	{`0.000001e-3`, 11},                    // 0.000000001
	{`1e+21`, 22},                          // 1000000000000000000000
	{`{"aa":1,"b":2}`, 17},                 // {"b": 2, "aa": 1}
	{" [ 1 , 2 ] ", 6},                     // [1, 2]
	{`{"a":{"a":1,"a":2}}`, 15},            // {"a": {"a": 2}}
	{`-0e-5`, 7},                           // 0.00000
	{`1.0e0`, 3},                           // 1.0
	{`1e131071`, 131072},
	{`1e-16383`, 16385},
	{`0.5e131072`, 131072},
	{`0.00001e131076`, 131072},
	{`0e1073741822`, 1},
	{`0.00000000000000000000e10`, 12},
	{`100e-2`, 4},
	{`{"\u0061":1,"a":2}`, 8}, // {"a": 2}: the escaped key is the same key
	{`true`, 4},
	{`[false, null]`, 13},
	{`"é"`, 4},
}

// jsonbRejected is valid JSON that PostgreSQL's jsonb refuses.
var jsonbRejected = []string{
	`"\u0000"`, `"\ud800"`, `"\udc00"`, `"\ud800x"`, `"\ud800\u0041"`,
	`1e131072`, `12e131071`, `1e-16384`, `10e-16384`, `0.0e-16383`, `0e-16384`,
	`0e1073741823`, `0e-1073741823`, `1e2147483647`, `1e99999999999999999999`,
	`{"k":[1,{"x":"\u0000"}]}`,
}

func TestJSONBTextLen(t *testing.T) {
	for _, c := range jsonbCases {
		if !json.Valid([]byte(c.in)) {
			t.Fatalf("test case %s is not valid JSON", c.in)
		}
		got, err := jsonbTextLen([]byte(c.in))
		if err != nil || got != c.want {
			t.Errorf("jsonbTextLen(%s) = %d, %v; want %d", c.in, got, err, c.want)
		}
	}
	for _, in := range jsonbRejected {
		if _, err := jsonbTextLen([]byte(in)); err == nil {
			t.Errorf("jsonbTextLen(%s) accepted it; PostgreSQL does not", in)
		}
	}
}

// TestJSONBTextLenMatchesPostgres checks the cases above and thousands of
// random documents, built from the constructs whose printed length differs
// from the input, against a real PostgreSQL.
func TestJSONBTextLenMatchesPostgres(t *testing.T) {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, testenv.Postgres(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)

	docs := make([]string, 0, 3000)
	for _, c := range jsonbCases {
		docs = append(docs, c.in)
	}
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
	for i, d := range docs {
		if !json.Valid([]byte(d)) {
			t.Fatalf("generated invalid JSON %s", d)
		}
		got, err := jsonbTextLen([]byte(d))
		if err != nil || got != lens[i] {
			t.Fatalf("jsonbTextLen(%s) = %d, %v; PostgreSQL prints %d bytes", d, got, err, lens[i])
		}
	}
	for _, d := range jsonbRejected {
		if _, err := conn.Exec(ctx, "SELECT $1::text::jsonb", d); err == nil {
			t.Errorf("PostgreSQL accepts %s, which jsonbTextLen rejects", d)
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

// FuzzJSONBTextLen: any valid JSON is measured without a panic, and a
// document that is accepted has a positive length.
func FuzzJSONBTextLen(f *testing.F) {
	for _, c := range jsonbCases {
		f.Add([]byte(c.in))
	}
	for _, in := range jsonbRejected {
		f.Add([]byte(in))
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
