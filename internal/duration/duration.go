// Package duration reads and writes durations the way the settings spell
// them ("30" seconds, "250ms", "7d"), for the configuration, the commands and
// the metrics' labels alike.
package duration

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Format writes a duration the way a user would: whole days as "7d",
// "1m" and "1h" rather than "1m0s" and "1h0m0s", zero as "0".
func Format(d time.Duration) string {
	switch {
	case d == 0:
		return "0"
	case d%(24*time.Hour) == 0:
		return strconv.FormatInt(int64(d/(24*time.Hour)), 10) + "d"
	}
	str := d.String()
	if d%time.Minute == 0 {
		str = strings.TrimSuffix(str, "0s")
	}
	if d%time.Hour == 0 {
		str = strings.TrimSuffix(str, "0m")
	}
	return str
}

// Parse accepts seconds as a bare number, a Go duration, or days as
// "7d" (optionally followed by a Go duration: "1d12h").
func Parse(v string) (time.Duration, error) {
	v = strings.TrimSpace(v)
	if f, err := strconv.ParseFloat(v, 64); err == nil {
		return time.Duration(f * float64(time.Second)), nil
	}
	if i := strings.IndexByte(v, 'd'); i > 0 {
		days, err := strconv.ParseFloat(v[:i], 64)
		if err != nil {
			return 0, fmt.Errorf("invalid duration %q", v)
		}
		d := time.Duration(days * float64(24*time.Hour))
		if rest := v[i+1:]; rest != "" {
			r, err := time.ParseDuration(rest)
			if err != nil {
				return 0, fmt.Errorf("invalid duration %q", v)
			}
			d += r
		}
		return d, nil
	}
	return time.ParseDuration(v)
}
