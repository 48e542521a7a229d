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
	if t, ok := parseCommonTimestamp(b, loc); ok {
		return t, nil
	}
	return parseAnyTimestamp(b, loc)
}

// parseAnyTimestamp is parseTimestamp for every form: years of five or six
// digits, offsets, infinity.
func parseAnyTimestamp(b []byte, loc *time.Location) (time.Time, error) {
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

// parseCommonTimestamp reads, by position, the form nearly every value takes: a
// four-digit year, no offset, up to six fraction digits ("2026-11-23
// 18:49:29.123456"). ok is false for anything else, which parseTimestamp's
// general parser then reads or rejects.
func parseCommonTimestamp(b []byte, loc *time.Location) (t time.Time, ok bool) {
	if len(b) < 19 || len(b) > 26 || b[4] != '-' || b[7] != '-' || b[10] != ' ' || b[13] != ':' || b[16] != ':' {
		return time.Time{}, false
	}
	hi, ok1 := twoDigits(b[0], b[1])
	lo, ok2 := twoDigits(b[2], b[3])
	month, ok3 := twoDigits(b[5], b[6])
	day, ok4 := twoDigits(b[8], b[9])
	hour, ok5 := twoDigits(b[11], b[12])
	minute, ok6 := twoDigits(b[14], b[15])
	sec, ok7 := twoDigits(b[17], b[18])
	if !(ok1 && ok2 && ok3 && ok4 && ok5 && ok6 && ok7) {
		return time.Time{}, false
	}
	year := hi*100 + lo
	nanos := 0
	if len(b) > 19 {
		if b[19] != '.' || len(b) == 20 {
			return time.Time{}, false
		}
		frac, ok := digitsAt(b, 20, len(b)-20)
		if !ok {
			return time.Time{}, false
		}
		nanos = frac * pow10[9-(len(b)-20)]
	}
	if year < 1 || month < 1 || month > 12 || day < 1 || day > daysIn(month, year) || hour > 23 || minute > 59 || sec > 59 {
		return time.Time{}, false
	}
	if loc != time.UTC {
		return time.Date(year, time.Month(month), day, hour, minute, sec, nanos, loc).UTC(), true
	}
	unix := daysSinceUnixEpoch(year, month, day)*86400 + int64(hour*3600+minute*60+sec)
	return time.Unix(unix, int64(nanos)).UTC(), true
}

var pow10 = [...]int{1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000}

// twoDigits reads two decimal digits without a loop: the fixed fields of the
// layout.
func twoDigits(a, b byte) (int, bool) {
	x, y := a-'0', b-'0'
	return int(x)*10 + int(y), x <= 9 && y <= 9
}

// digitsAt reads the n decimal digits of b starting at i.
func digitsAt(b []byte, i, n int) (int, bool) {
	v := 0
	for _, c := range b[i : i+n] {
		d := c - '0'
		if d > 9 {
			return 0, false
		}
		v = v*10 + int(d)
	}
	return v, true
}

func daysIn(month, year int) int {
	switch month {
	case 2:
		if year%4 == 0 && (year%100 != 0 || year%400 == 0) {
			return 29
		}
		return 28
	case 4, 6, 9, 11:
		return 30
	}
	return 31
}

// daysSinceUnixEpoch counts the days from 1970-01-01 to a proleptic Gregorian
// date of a positive year (Howard Hinnant's days_from_civil).
func daysSinceUnixEpoch(year, month, day int) int64 {
	if month <= 2 {
		year--
	}
	era := year / 400
	yoe := year - era*400
	mp := (month + 9) % 12
	doy := (153*mp+2)/5 + day - 1
	doe := yoe*365 + yoe/4 - yoe/100 + doy
	return int64(era*146097 + doe - 719468)
}
