package replication

import (
	"errors"
	"fmt"
	"time"
)

// parseTimestamp parses PostgreSQL's ISO output of timestamp and timestamptz values
// ("2026-11-23 18:49:29.123456", optionally followed by an offset such as "+00" or
// "+05:30"). The replication connection forces DateStyle=ISO, so this is the only
// layout to expect. Values without an offset are read in loc. It returns an error for
// infinity, BC dates and anything it cannot read, so the row is failed rather than
// delivered with a wrong time.
func parseTimestamp(b []byte, loc *time.Location) (time.Time, error) {
	s := b
	if len(s) == 0 {
		return time.Time{}, errors.New("empty timestamp")
	}
	switch string(s) {
	case "infinity", "-infinity":
		return time.Time{}, fmt.Errorf("%s cannot be stored in ClickHouse", s)
	}
	p := tsParser{s: s}
	year := p.digits(4, 6)
	p.expect('-')
	month := p.digits(2, 2)
	p.expect('-')
	day := p.digits(2, 2)
	p.expect(' ')
	hour := p.digits(2, 2)
	p.expect(':')
	minute := p.digits(2, 2)
	p.expect(':')
	sec := p.digits(2, 2)
	nanos := 0
	if p.ok() && p.peek() == '.' {
		p.i++
		start := p.i
		frac := p.digits(1, 9)
		for n := p.i - start; n < 9; n++ {
			frac *= 10
		}
		nanos = frac
	}
	tz := loc
	if p.ok() && (p.peek() == '+' || p.peek() == '-') {
		sign := 1
		if p.peek() == '-' {
			sign = -1
		}
		p.i++
		off := p.digits(2, 2) * 3600
		if p.ok() && p.peek() == ':' {
			p.i++
			off += p.digits(2, 2) * 60
			if p.ok() && p.peek() == ':' {
				p.i++
				off += p.digits(2, 2)
			}
		}
		tz = time.FixedZone("", sign*off)
	}
	if p.err != nil || p.i != len(s) {
		return time.Time{}, fmt.Errorf("cannot parse timestamp %q", b)
	}
	if month < 1 || month > 12 || day < 1 || day > 31 || hour > 23 || minute > 59 || sec > 60 {
		return time.Time{}, fmt.Errorf("timestamp %q out of range", b)
	}
	return time.Date(year, time.Month(month), day, hour, minute, sec, nanos, tz).UTC(), nil
}

type tsParser struct {
	s   []byte
	i   int
	err error
}

func (p *tsParser) ok() bool { return p.err == nil && p.i < len(p.s) }

func (p *tsParser) peek() byte { return p.s[p.i] }

func (p *tsParser) expect(c byte) {
	if p.err != nil {
		return
	}
	if p.i >= len(p.s) || p.s[p.i] != c {
		p.err = errors.New("unexpected character")
		return
	}
	p.i++
}

// digits reads between min and max decimal digits.
func (p *tsParser) digits(min, max int) int {
	if p.err != nil {
		return 0
	}
	n, v := 0, 0
	for p.i < len(p.s) && n < max && p.s[p.i] >= '0' && p.s[p.i] <= '9' {
		v = v*10 + int(p.s[p.i]-'0')
		p.i++
		n++
	}
	if n < min {
		p.err = errors.New("too few digits")
	}
	return v
}
