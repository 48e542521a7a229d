package replication

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"
	"unsafe"

	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// ErrSpillFull is returned when the rows of in-progress streamed transactions
// would pass the spill's bound (STREAM_SPILL_MAX_BYTES). Nothing is lost: the
// rows were never acknowledged, and the server sends the transactions again.
var ErrSpillFull = errors.New("the local spill of in-progress transactions is full")

// spill keeps the rows of streamed transactions (protocol 2) that have not
// committed yet, one append-only file per top-level transaction, so that a
// transaction of any size costs the streamer disk, not memory. A row carries
// the subtransaction it belongs to; a subtransaction's abort is a mark that
// the replay skips. A spill is only valid for one replication session: the
// server streams an unfinished transaction again from its start after a
// reconnect, so the directory is emptied when a spill is opened.
type spill struct {
	dir      string
	maxBytes int64 // 0: no bound
	bytes    int64 // written by the open transactions
	txns     map[uint32]*spillTxn
	enc      []byte // reused encoding buffer
}

type spillTxn struct {
	f       *os.File
	w       *bufio.Writer
	bytes   int64
	rows    int
	subRows map[uint32]int  // rows per subtransaction
	aborted map[uint32]bool // subtransactions rolled back
}

// openSpill empties dir (what a previous session left is stale) and returns
// a spill over it.
func openSpill(dir string, maxBytes int64) (*spill, error) {
	if err := os.RemoveAll(dir); err != nil {
		return nil, fmt.Errorf("clean the spill directory %s: %w", dir, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create the spill directory %s: %w", dir, err)
	}
	return &spill{dir: dir, maxBytes: maxBytes, txns: make(map[uint32]*spillTxn)}, nil
}

// Bytes is what the open transactions hold on disk.
func (s *spill) Bytes() int64 { return s.bytes }

// Open is how many transactions the spill holds.
func (s *spill) Open() int { return len(s.txns) }

// Holds reports whether transaction xid has rows here.
func (s *spill) Holds(xid uint32) bool { return s.txns[xid] != nil }

// Append adds a row of subtransaction sub to top-level transaction xid.
func (s *spill) Append(xid, sub uint32, ev *record.Event) error {
	t := s.txns[xid]
	if t == nil {
		f, err := os.OpenFile(filepath.Join(s.dir, "xid-"+strconv.FormatUint(uint64(xid), 10)), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return fmt.Errorf("spill transaction %d: %w", xid, err)
		}
		t = &spillTxn{f: f, w: bufio.NewWriterSize(f, 64<<10), subRows: make(map[uint32]int)}
		s.txns[xid] = t
	}
	s.enc = encodeSpilled(s.enc[:0], sub, ev)
	if s.maxBytes > 0 && s.bytes+int64(len(s.enc)) > s.maxBytes {
		return fmt.Errorf("%w (%d bytes, STREAM_SPILL_MAX_BYTES %d)", ErrSpillFull, s.bytes, s.maxBytes)
	}
	if _, err := t.w.Write(s.enc); err != nil {
		return fmt.Errorf("spill transaction %d: %w", xid, err)
	}
	t.bytes += int64(len(s.enc))
	t.rows++
	t.subRows[sub]++
	s.bytes += int64(len(s.enc))
	return nil
}

// Abort drops transaction xid (sub == xid) or marks its subtransaction sub
// as rolled back.
func (s *spill) Abort(xid, sub uint32) {
	t := s.txns[xid]
	if t == nil {
		return // nothing of it was an outbox insert
	}
	if sub == xid {
		s.drop(xid)
		return
	}
	if t.aborted == nil {
		t.aborted = make(map[uint32]bool)
	}
	t.aborted[sub] = true
}

// Committed returns how many rows of transaction xid a replay delivers and
// which of its subtransactions (with rows) were rolled back.
func (s *spill) Committed(xid uint32) (rows int, aborted []uint32) {
	t := s.txns[xid]
	if t == nil {
		return 0, nil
	}
	rows = t.rows
	for sub := range t.aborted {
		if n := t.subRows[sub]; n > 0 {
			rows -= n
			aborted = append(aborted, sub)
		}
	}
	return rows, aborted
}

// Replay calls fn with every row of committed transaction xid, in the order
// they were streamed, skipping rolled-back subtransactions, then drops it.
// The event passed to fn is reused: fn must copy what it keeps (a value copy
// suffices; its strings are fresh).
func (s *spill) Replay(xid uint32, fn func(ev *record.Event) error) error {
	t := s.txns[xid]
	if t == nil {
		return nil
	}
	defer s.drop(xid)
	if err := t.w.Flush(); err != nil {
		return fmt.Errorf("spill transaction %d: %w", xid, err)
	}
	if _, err := t.f.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("read spilled transaction %d: %w", xid, err)
	}
	r := bufio.NewReaderSize(t.f, 64<<10)
	var ev record.Event
	var buf []byte
	var strs stringBlock
	for i := 0; i < t.rows; i++ {
		var err error
		var sub uint32
		if buf, sub, err = decodeSpilled(r, buf, &ev, &strs); err != nil {
			return fmt.Errorf("read spilled transaction %d, row %d: %w", xid, i, err)
		}
		if t.aborted[sub] {
			continue
		}
		if err := fn(&ev); err != nil {
			return err
		}
	}
	return nil
}

func (s *spill) drop(xid uint32) {
	t := s.txns[xid]
	if t == nil {
		return
	}
	s.bytes -= t.bytes
	name := t.f.Name()
	t.f.Close()
	os.Remove(name)
	delete(s.txns, xid)
}

// Close drops every open transaction and the directory.
func (s *spill) Close() error {
	for xid := range s.txns {
		s.drop(xid)
	}
	return os.RemoveAll(s.dir)
}

// noTime stands for a zero time.Time (no value) in a spilled row.
const noTime = uint64(1) << 63

// A spilled row: its length (u32), then subxid u32, id i64, metadata_version
// i64, event time and created_at as unix seconds i64 + nanoseconds u32 (any
// year), then type, environment, context and problem as u32 length + bytes.
func encodeSpilled(b []byte, sub uint32, ev *record.Event) []byte {
	b = append(b, 0, 0, 0, 0) // length, filled in below
	b = binary.BigEndian.AppendUint32(b, sub)
	b = binary.BigEndian.AppendUint64(b, uint64(ev.ID))
	b = binary.BigEndian.AppendUint64(b, uint64(ev.MetadataVersion))
	for _, t := range [2]time.Time{ev.Time, ev.CreatedAt} {
		if t.IsZero() {
			b = binary.BigEndian.AppendUint64(b, noTime)
			b = binary.BigEndian.AppendUint32(b, 0)
			continue
		}
		b = binary.BigEndian.AppendUint64(b, uint64(t.Unix()))
		b = binary.BigEndian.AppendUint32(b, uint32(t.Nanosecond()))
	}
	for _, str := range [4]string{ev.Type, ev.Environment, ev.Context, ev.Problem} {
		b = binary.BigEndian.AppendUint32(b, uint32(len(str)))
		b = append(b, str...)
	}
	binary.BigEndian.PutUint32(b, uint32(len(b)-4))
	return b
}

// decodeSpilled reads one row written by encodeSpilled into ev (its strings
// come from strs; buf is a reusable read buffer).
func decodeSpilled(r *bufio.Reader, buf []byte, ev *record.Event, strs *stringBlock) ([]byte, uint32, error) {
	if cap(buf) < 4 {
		buf = make([]byte, 4, 256)
	}
	// The length is read into buf: a local array would escape through io.ReadFull.
	if _, err := io.ReadFull(r, buf[:4]); err != nil {
		return buf, 0, err
	}
	n := int(binary.BigEndian.Uint32(buf[:4]))
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		return buf, 0, err
	}
	const fixed = 4 + 8 + 8 + 2*12
	if n < fixed+4*4 {
		return buf, 0, fmt.Errorf("%w: spilled row of %d bytes", ErrMalformed, n)
	}
	sub := binary.BigEndian.Uint32(buf)
	*ev = record.Event{ID: int64(binary.BigEndian.Uint64(buf[4:])), MetadataVersion: int64(binary.BigEndian.Uint64(buf[12:]))}
	times := [2]*time.Time{&ev.Time, &ev.CreatedAt}
	for i, p := range times {
		off := 20 + 12*i
		if sec := binary.BigEndian.Uint64(buf[off:]); sec != noTime {
			*p = time.Unix(int64(sec), int64(binary.BigEndian.Uint32(buf[off+8:]))).UTC()
		}
	}
	rest := buf[fixed:]
	// The four strings share bytes from strs, as the decoder's three do.
	copied := strs.alloc(len(rest))
	copy(copied, rest)
	all := unsafe.String(unsafe.SliceData(copied), len(copied)) // never written again
	fields := [4]*string{&ev.Type, &ev.Environment, &ev.Context, &ev.Problem}
	pos := 0
	for _, p := range fields {
		if pos+4 > len(rest) {
			return buf, 0, fmt.Errorf("%w: spilled row cut short", ErrMalformed)
		}
		l := int(binary.BigEndian.Uint32(rest[pos:]))
		pos += 4
		if pos+l > len(rest) {
			return buf, 0, fmt.Errorf("%w: spilled row cut short", ErrMalformed)
		}
		*p = all[pos : pos+l]
		pos += l
	}
	return buf, sub, nil
}
