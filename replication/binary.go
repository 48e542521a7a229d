package replication

import (
	"encoding/binary"
	"errors"
	"math"
	"time"
)

// Type OIDs (pg_type) of the column types the decoder reads in pgoutput's
// binary format: their send functions' output is fixed (int2send, int8send,
// timestamp_send, jsonb_send, textsend, ...).
const (
	oidInt2        = 21
	oidInt4        = 23
	oidInt8        = 20
	oidText        = 25
	oidVarchar     = 1043
	oidBpchar      = 1042
	oidJSON        = 114
	oidJSONB       = 3802
	oidTimestamp   = 1114
	oidTimestampTZ = 1184
)

// binaryDecodable reports whether outbox field f can be read in binary format
// from a column of type oid.
func binaryDecodable(f int, oid uint32) bool {
	switch f {
	case fID, fMetadataVersion:
		return oid == oidInt2 || oid == oidInt4 || oid == oidInt8
	case fType, fEnvironment, fStatus:
		return oid == oidText || oid == oidVarchar || oid == oidBpchar
	case fContext:
		return oid == oidText || oid == oidVarchar || oid == oidBpchar || oid == oidJSON || oid == oidJSONB
	case fTime, fCreatedAt:
		return oid == oidTimestamp || oid == oidTimestampTZ
	}
	return false
}

// BinaryDecodable reports whether the decoder reads the outbox column named
// col, of type oid, in binary format; columns the pipeline does not read
// always are.
func BinaryDecodable(col string, oid uint32) bool {
	f := fieldOf(col)
	return f < 0 || binaryDecodable(int(f), oid)
}

// intValue reads an integer column: decimal text, or the big-endian two's
// complement of int2, int4 and int8.
func intValue(c column, oid uint32) (int64, bool) {
	if c.kind != 'b' {
		return parseInt(c.val)
	}
	switch {
	case oid == oidInt8 && len(c.val) == 8:
		return int64(binary.BigEndian.Uint64(c.val)), true
	case oid == oidInt4 && len(c.val) == 4:
		return int64(int32(binary.BigEndian.Uint32(c.val))), true
	case oid == oidInt2 && len(c.val) == 2:
		return int64(int16(binary.BigEndian.Uint16(c.val))), true
	}
	return 0, false
}

// jsonbVersion is the one format of jsonb_send: a version byte, then the text.
const jsonbVersion = 1

// textValue returns the text of a string column. Binary text, varchar, bpchar
// and json are the text itself; binary jsonb is the text after a version byte
// (checkBinary refused other versions).
func textValue(c column, oid uint32) []byte {
	if c.kind != 'b' || oid != oidJSONB || len(c.val) == 0 {
		return c.val
	}
	return c.val[1:]
}

// pgEpochUnix is 2000-01-01 00:00:00 UTC in unix seconds: the zero of binary
// timestamps.
const pgEpochUnix = 946684800

// timeValue reads a timestamp column: text (parseTimestamp), or the binary
// int64 microseconds since 2000-01-01 — an instant for timestamptz, a wall
// clock in the decoder's zone for timestamp.
func (d *Decoder) timeValue(c column, oid uint32) (time.Time, error) {
	if c.kind != 'b' {
		return parseTimestamp(c.val, d.loc)
	}
	if len(c.val) != 8 {
		return time.Time{}, errors.New("binary timestamp is not 8 bytes")
	}
	us := int64(binary.BigEndian.Uint64(c.val))
	switch us {
	case math.MaxInt64:
		return time.Time{}, errors.New("infinity cannot be stored in ClickHouse")
	case math.MinInt64:
		return time.Time{}, errors.New("-infinity cannot be stored in ClickHouse")
	}
	sec, frac := us/1e6, us%1e6
	if frac < 0 {
		sec, frac = sec-1, frac+1e6
	}
	t := time.Unix(pgEpochUnix+sec, frac*1000).UTC()
	if t.Year() < 1 {
		// The text form of these is a BC date, which parseTimestamp refuses too.
		return time.Time{}, errors.New("BC dates cannot be stored in ClickHouse")
	}
	if oid == oidTimestamp && d.loc != time.UTC {
		t = time.Date(t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second(), t.Nanosecond(), d.loc).UTC()
	}
	return t, nil
}
