package sink

import (
	"strconv"
	"strings"
	"time"
)

// quoteString quotes s as a ClickHouse string literal.
func quoteString(s string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(s) + "'"
}

func timeLiteral(legacy bool, t time.Time) string {
	// Numbers, not date strings: nothing to parse, and no time zone rules.
	if legacy {
		return "toDateTime(" + strconv.FormatInt(t.Unix(), 10) + ", 'UTC')"
	}
	return "fromUnixTimestamp64Micro(toInt64(" + strconv.FormatInt(t.UnixMicro(), 10) + "), 'UTC')"
}

// QuoteIdent quotes a ClickHouse identifier with backticks.
func QuoteIdent(s string) string {
	s = strings.ReplaceAll(s, `\`, `\\`)
	return "`" + strings.ReplaceAll(s, "`", "\\`") + "`"
}
