package outbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"unicode/utf16"
	"unicode/utf8"
)

// PostgreSQL's numeric type, which jsonb uses for every number, holds at most
// 131072 digits before the decimal point and 16383 after it, and its input
// routine refuses exponents of INT_MAX/2 or more before PostgreSQL 18 and
// more than INT_MAX/2 from 18 on: the stricter rule, so that an event is valid
// on every supported server (values checked against PostgreSQL 13–18:
// 1e131071 and 1e-16383 are accepted, 1e131072 and 10e-16384 are not, and
// 0e1073741823 is only from 18 on).
const (
	pgNumericMaxIntDigits = 131072
	pgNumericMaxScale     = 16383
	pgNumericMaxExponent  = 1<<30 - 1 // INT_MAX / 2
)

// jsonbTextLen returns the length in bytes of the text PostgreSQL prints for
// raw once it is stored as jsonb, or an error for JSON that PostgreSQL's jsonb
// rejects although it is valid JSON.
//
// This is the size that matters: the streamer receives event_context as
// PostgreSQL prints it (pgoutput sends jsonb as text) and fails rows whose text
// exceeds EVENT_MAX_CONTEXT_BYTES. The printed text can be much larger than
// what the producer sent — jsonb prints ", " and ": " between items and writes
// numbers out in full (1e+21 becomes 22 digits) — or smaller (whitespace,
// duplicate keys and needless escapes are dropped). Measuring the input would
// let through events the streamer then fails.
//
// raw must be valid JSON (json.Valid) and valid UTF-8; jsonbTextLen only
// measures, it does not check the syntax again. It assumes a UTF-8 database,
// where jsonb prints non-ASCII characters as raw UTF-8.
func jsonbTextLen(raw []byte) (int, error) {
	s := jsonbScanner{b: raw}
	return s.value()
}

// errNUL and friends are the reasons jsonb refuses valid JSON.
var (
	errNUL           = errors.New(`contains \u0000 (a NUL character), which PostgreSQL's jsonb cannot store`)
	errLoneSurrogate = errors.New("contains an unpaired UTF-16 surrogate escape, which PostgreSQL's jsonb rejects")
)

// jsonbScanner walks valid JSON and adds up the length of jsonb's rendering.
type jsonbScanner struct {
	b []byte
	i int
}

// peek returns the current byte, or 0 at the end of the input.
func (s *jsonbScanner) peek() byte {
	if s.i < len(s.b) {
		return s.b[s.i]
	}
	return 0
}

func (s *jsonbScanner) skipSpace() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

func (s *jsonbScanner) value() (int, error) {
	s.skipSpace()
	switch s.peek() {
	case '{':
		return s.object()
	case '[':
		return s.array()
	case '"':
		n, _, err := s.str(false)
		return n, err
	case 't', 'n': // true, null
		s.i += 4
		return 4, nil
	case 'f': // false
		s.i += 5
		return 5, nil
	default:
		return s.number()
	}
}

// object measures {"k": v, ...}. jsonb keeps only the last value of a
// duplicated key (and sorts keys, which does not change the length).
func (s *jsonbScanner) object() (int, error) {
	s.i++ // {
	s.skipSpace()
	if s.peek() == '}' {
		s.i++
		return 2, nil
	}
	members := make(map[string]int) // key -> length of `"key": value`
	for {
		s.skipSpace()
		klen, key, err := s.str(true)
		if err != nil {
			return 0, err
		}
		s.skipSpace()
		s.i++ // :
		vlen, err := s.value()
		if err != nil {
			return 0, err
		}
		members[key] = klen + 2 + vlen
		s.skipSpace()
		c := s.peek()
		s.i++ // , or }
		if c != ',' {
			break
		}
	}
	n := 2 + 2*(len(members)-1)
	for _, m := range members {
		n += m
	}
	return n, nil
}

// array measures [v, ...].
func (s *jsonbScanner) array() (int, error) {
	s.i++ // [
	s.skipSpace()
	if s.peek() == ']' {
		s.i++
		return 2, nil
	}
	n := 2
	for items := 0; ; items++ {
		if items > 0 {
			n += 2 // ", "
		}
		vlen, err := s.value()
		if err != nil {
			return 0, err
		}
		n += vlen
		s.skipSpace()
		c := s.peek()
		s.i++ // , or ]
		if c != ',' {
			return n, nil
		}
	}
}

// str measures a string as jsonb prints it: escapes decoded, then re-escaped
// the way PostgreSQL's escape_json does (", \ and \b \f \n \r \t as two
// characters, other control characters as \u00XX, everything else raw). With
// wantKey it also returns the decoded string, to recognise duplicate keys.
func (s *jsonbScanner) str(wantKey bool) (int, string, error) {
	s.i++ // opening quote
	start := s.i
	n := 2
	escaped := false
	for {
		c := s.b[s.i]
		switch {
		case c == '"':
			end := s.i
			s.i++
			if !wantKey {
				return n, "", nil
			}
			if !escaped {
				return n, string(s.b[start:end]), nil
			}
			// Surrogates and \u0000 were rejected above, so Go decodes the
			// key exactly as PostgreSQL does.
			var key string
			if err := json.Unmarshal(s.b[start-1:end+1], &key); err != nil {
				return 0, "", fmt.Errorf("decode object key: %w", err)
			}
			return n, key, nil
		case c == '\\':
			escaped = true
			e := s.b[s.i+1]
			s.i += 2
			switch e {
			case '"', '\\', 'b', 'f', 'n', 'r', 't':
				n += 2
			case '/':
				n++ // printed as a plain /
			case 'u':
				r := hex4(s.b[s.i:])
				s.i += 4
				switch {
				case r == 0:
					return 0, "", errNUL
				case utf16.IsSurrogate(r):
					// A high surrogate must be followed by an escaped low one.
					if r >= 0xDC00 || s.i+6 > len(s.b) || s.b[s.i] != '\\' || s.b[s.i+1] != 'u' {
						return 0, "", errLoneSurrogate
					}
					lo := hex4(s.b[s.i+2:])
					if lo < 0xDC00 || lo > 0xDFFF {
						return 0, "", errLoneSurrogate
					}
					s.i += 6
					r = utf16.DecodeRune(r, lo)
				}
				n += escapedRuneLen(r)
			}
		default:
			// A raw byte: valid JSON has no raw control characters, and the
			// bytes of a multi-byte UTF-8 character are printed as they are.
			n++
			s.i++
		}
	}
}

// escapedRuneLen is the length of r as escape_json prints it.
func escapedRuneLen(r rune) int {
	switch {
	case r == '"' || r == '\\' || r == '\b' || r == '\f' || r == '\n' || r == '\r' || r == '\t':
		return 2
	case r < 0x20:
		return 6 // \u00XX
	default:
		return utf8.RuneLen(r)
	}
}

// hex4 decodes the four hex digits at the start of b (valid JSON has them).
func hex4(b []byte) rune {
	var r rune
	for _, c := range b[:4] {
		r <<= 4
		switch {
		case c >= '0' && c <= '9':
			r |= rune(c - '0')
		case c >= 'a' && c <= 'f':
			r |= rune(c - 'a' + 10)
		default:
			r |= rune(c - 'A' + 10)
		}
	}
	return r
}

// number measures a number as numeric_out prints it. numeric_in keeps every
// digit written and the scale (digits after the point) of the literal minus its
// exponent, so 1.50e1 prints as 15.0, 1e2 as 100 and 100e-2 as 1.00; leading
// zeros and the sign of zero are dropped.
func (s *jsonbScanner) number() (int, error) {
	start := s.i
	neg := false
	if s.peek() == '-' {
		neg = true
		s.i++
	}
	intStart := s.i
	for isDigit(s.peek()) {
		s.i++
	}
	intDigits := s.b[intStart:s.i]
	var frac []byte
	if s.peek() == '.' {
		s.i++
		fracStart := s.i
		for isDigit(s.peek()) {
			s.i++
		}
		frac = s.b[fracStart:s.i]
	}
	exp := 0
	if c := s.peek(); c == 'e' || c == 'E' {
		s.i++
		expNeg := false
		switch s.peek() {
		case '-':
			expNeg = true
			s.i++
		case '+':
			s.i++
		}
		for isDigit(s.peek()) {
			// Saturate: anything this large is out of range anyway, and
			// leading zeros must not count.
			if exp <= pgNumericMaxExponent {
				exp = exp*10 + int(s.peek()-'0')
			}
			s.i++
		}
		if expNeg {
			exp = -exp
		}
	}
	if exp >= pgNumericMaxExponent || exp <= -pgNumericMaxExponent {
		return 0, fmt.Errorf("number %s has an exponent outside PostgreSQL's numeric range", abbreviate(s.b[start:s.i]))
	}

	scale := max(len(frac)-exp, 0)
	if scale > pgNumericMaxScale {
		return 0, fmt.Errorf("number %s has %d digits after the point, over PostgreSQL's numeric limit of %d",
			abbreviate(s.b[start:s.i]), scale, pgNumericMaxScale)
	}
	// Leading zeros of the digits (before and after the point) do not count.
	lead := 0
	for lead < len(intDigits) && intDigits[lead] == '0' {
		lead++
	}
	if lead == len(intDigits) {
		for j := 0; j < len(frac) && frac[j] == '0'; j++ {
			lead++
		}
	}
	zero := lead == len(intDigits)+len(frac)
	n := 1 // "0" when there is no integer part
	if !zero {
		if before := len(intDigits) + exp - lead; before > 0 {
			if before > pgNumericMaxIntDigits {
				return 0, fmt.Errorf("number %s has %d digits before the point, over PostgreSQL's numeric limit of %d",
					abbreviate(s.b[start:s.i]), before, pgNumericMaxIntDigits)
			}
			n = before
		}
		if neg {
			n++
		}
	}
	if scale > 0 {
		n += 1 + scale
	}
	return n, nil
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

// abbreviate shortens a long literal for an error message.
func abbreviate(b []byte) string {
	if len(b) > 40 {
		return string(b[:37]) + "..."
	}
	return string(b)
}
