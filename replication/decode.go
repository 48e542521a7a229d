package replication

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
	"unsafe"

	"github.com/outbox-streamer/outbox-streamer/internal/record"
)

// Kind says what a decoded pgoutput message was.
type Kind uint8

// Kinds of decoded messages the pipeline acts on; everything else is KindIgnored.
const (
	KindIgnored Kind = iota
	KindBegin
	KindCommit
	KindRelation
	// KindInsert is a row of the outbox table that the stream must deliver.
	KindInsert
	// Protocol 2 (streaming of in-progress transactions): a chunk of the
	// transaction Xid starts or stops; the transaction commits (CommitLSN,
	// EndLSN, CommitTime) or aborts — all of it when SubXid == Xid, else the
	// subtransaction SubXid.
	KindStreamStart
	KindStreamStop
	KindStreamCommit
	KindStreamAbort
)

// Message is one decoded pgoutput message (protocol version 1, or 2 with
// streaming). Decode fills a caller-owned Message so the hot path allocates
// only the row's own strings.
type Message struct {
	Kind Kind
	// Begin: FinalLSN is the LSN of the commit record to come.
	FinalLSN uint64
	// Commit: CommitLSN is the commit record's LSN, EndLSN the position after it
	// (what the slot is acknowledged with).
	CommitLSN uint64
	EndLSN    uint64
	// Begin and Commit.
	CommitTime time.Time
	// Xid is the transaction of a Begin or of a streamed message (the
	// top-level one, from its Stream Start).
	Xid uint32
	// SubXid is the (sub)transaction a streamed insert belongs to, or the one
	// a Stream Abort rolls back.
	SubXid uint32
	// Streamed marks an insert that arrived inside a Stream Start/Stop chunk:
	// its transaction has not committed yet (it may never), so its commit
	// LSN, time and xid are not stamped on the event.
	Streamed bool
	// Insert: the decoded row.
	Event record.Event
}

// ErrMalformed is wrapped by every error about a message that cannot be decoded.
var ErrMalformed = errors.New("malformed pgoutput message")

// ErrBinaryType is wrapped by the error about a value in binary format of a
// type the decoder has no binary reader for (see REPLICATION_BINARY).
var ErrBinaryType = errors.New("no binary decoder for the column's type (set REPLICATION_BINARY=off)")

// postgresEpoch is the zero of the replication protocol's timestamps.
var postgresEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// Decoder turns pgoutput messages into pipeline messages. It keeps the relation
// descriptions the server sends, so columns are mapped by name and a schema change in
// the middle of the stream (new or reordered columns) is honoured. It is not safe for
// concurrent use.
type Decoder struct {
	schema, table string
	loc           *time.Location
	relations     map[uint32]*relation

	// Protocol 2: inside a Stream Start/Stop chunk of transaction streamXid.
	// Relation messages of a streamed transaction describe the table as that
	// transaction sees it, which may never commit: they are kept per
	// transaction (streamRels), dropped if it aborts and made everyone's if
	// it commits, as pgoutput itself then treats them as sent.
	inStream   bool
	streamXid  uint32
	streamRels map[uint32]map[uint32]*relation

	// The transaction being decoded, stamped on its rows.
	txnCommitLSN  uint64
	txnXid        uint32
	txnCommitTime time.Time

	strings stringBlock
}

// relation is a table description from a Relation message: which outbox field each
// column holds, looked up per column of a row instead of per field.
type relation struct {
	outbox bool
	ncols  int
	// field is the outbox field of each column, or -1 for the columns the
	// pipeline does not read.
	field []int8
	// typ is the type OID of each outbox field's column: how a value in
	// binary format is read.
	typ [numFields]uint32
}

// The outbox columns the decoder maps by name.
const (
	fID = iota
	fType
	fTime
	fEnvironment
	fContext
	fMetadataVersion
	fCreatedAt
	fStatus
	numFields
)

var fieldNames = [numFields]string{
	fID:              "id",
	fType:            "event_type",
	fTime:            "event_date_time",
	fEnvironment:     "environment",
	fContext:         "event_context",
	fMetadataVersion: "metadata_version",
	fCreatedAt:       "created_at",
	fStatus:          "status",
}

// NewDecoder returns a decoder for inserts into schema.table. Timestamps without time
// zone are read in loc (UTC when nil).
func NewDecoder(schema, table string, loc *time.Location) *Decoder {
	if loc == nil {
		loc = time.UTC
	}
	return &Decoder{schema: schema, table: table, loc: loc, relations: make(map[uint32]*relation),
		streamRels: make(map[uint32]map[uint32]*relation)}
}

// Decode decodes one pgoutput message into m. It never panics: truncated or corrupt
// input yields an error wrapping ErrMalformed.
func (d *Decoder) Decode(data []byte, m *Message) (err error) {
	defer func() {
		// Belt and braces: the reader checks every bound, but a decoding bug must
		// surface as an error on this message, not crash the streamer.
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: panic while decoding: %v", ErrMalformed, r)
		}
	}()
	*m = Message{}
	if len(data) == 0 {
		return fmt.Errorf("%w: empty message", ErrMalformed)
	}
	r := reader{buf: data[1:]}
	switch data[0] {
	case 'B':
		m.Kind = KindBegin
		m.FinalLSN = r.u64()
		m.CommitTime = pgTime(r.i64())
		m.Xid = r.u32()
		if r.err == nil {
			d.txnCommitLSN, d.txnCommitTime, d.txnXid = m.FinalLSN, m.CommitTime, m.Xid
		}
	case 'C':
		m.Kind = KindCommit
		r.u8() // flags, unused
		m.CommitLSN = r.u64()
		m.EndLSN = r.u64()
		m.CommitTime = pgTime(r.i64())
	case 'R':
		m.Kind = KindRelation
		if d.inStream {
			r.u32() // the (sub)transaction's xid
		}
		d.decodeRelation(&r)
	case 'I':
		if d.inStream {
			m.Streamed, m.Xid, m.SubXid = true, d.streamXid, r.u32()
		}
		d.decodeInsert(&r, m)
	case 'S':
		m.Kind = KindStreamStart
		m.Xid = r.u32()
		r.u8() // first segment of this transaction, or not
		if r.err == nil {
			d.inStream, d.streamXid = true, m.Xid
		}
	case 'E':
		m.Kind = KindStreamStop
		d.inStream = false
	case 'c':
		m.Kind = KindStreamCommit
		m.Xid = r.u32()
		r.u8() // flags, unused
		m.CommitLSN = r.u64()
		m.EndLSN = r.u64()
		m.CommitTime = pgTime(r.i64())
		if r.err == nil {
			// pgoutput counts a committed streamed transaction's schema as
			// sent to every later transaction (cleanup_rel_sync_cache): its
			// relations become everyone's.
			for id, rel := range d.streamRels[m.Xid] {
				d.relations[id] = rel
			}
			delete(d.streamRels, m.Xid)
		}
	case 'A':
		// Protocol 4 appends the abort's LSN and time; 2 and 3 end here.
		m.Kind = KindStreamAbort
		m.Xid = r.u32()
		m.SubXid = r.u32()
		if r.err == nil && m.SubXid == m.Xid {
			delete(d.streamRels, m.Xid)
		}
	default:
		// Type, Origin, Update, Delete, Truncate, logical messages (streamed
		// or not): not the pipeline's business (the publication carries only
		// inserts).
		m.Kind = KindIgnored
	}
	if r.err != nil {
		if errors.Is(r.err, ErrBinaryType) {
			return fmt.Errorf("%q message: %w", data[0], r.err) // well-formed, just unreadable
		}
		return fmt.Errorf("%w: %q message: %v", ErrMalformed, data[0], r.err)
	}
	return nil
}

func (d *Decoder) decodeRelation(r *reader) {
	id := r.u32()
	ns := r.cstring()
	name := r.cstring()
	r.u8() // replica identity
	n := int(r.u16())
	rel := &relation{outbox: ns == d.schema && name == d.table, ncols: n}
	if r.err == nil && n <= len(r.buf) { // a count the message cannot hold allocates nothing
		rel.field = make([]int8, n)
	}
	for i := 0; i < n && r.err == nil; i++ {
		r.u8() // flags
		col := r.cstring()
		oid := r.u32()
		r.u32() // type modifier
		if i < len(rel.field) {
			rel.field[i] = fieldOf(col)
			if f := rel.field[i]; f >= 0 {
				rel.typ[f] = oid
			}
		}
	}
	if r.err != nil {
		return
	}
	if !d.inStream {
		d.relations[id] = rel
		return
	}
	rels := d.streamRels[d.streamXid]
	if rels == nil {
		rels = make(map[uint32]*relation)
		d.streamRels[d.streamXid] = rels
	}
	rels[id] = rel
}

// fieldOf is the outbox field a column named col holds, or -1.
func fieldOf(col string) int8 {
	for f, name := range fieldNames {
		if col == name {
			return int8(f)
		}
	}
	return -1
}

// relation returns the description of relation id as the message being
// decoded sees it: a streamed transaction's own first.
func (d *Decoder) relation(id uint32) (*relation, bool) {
	if d.inStream {
		if rel, ok := d.streamRels[d.streamXid][id]; ok {
			return rel, true
		}
	}
	rel, ok := d.relations[id]
	return rel, ok
}

func (d *Decoder) decodeInsert(r *reader, m *Message) {
	id := r.u32()
	if tag := r.u8(); r.err == nil && tag != 'N' {
		r.fail(fmt.Errorf("insert: tuple tag %q, want 'N'", tag))
		return
	}
	rel, ok := d.relation(id)
	if r.err != nil {
		return
	}
	if !ok {
		r.fail(fmt.Errorf("insert into relation %d before its Relation message", id))
		return
	}
	if !rel.outbox {
		m.Kind = KindIgnored
		return
	}
	var cols [numFields]column
	if readTuple(r, rel, &cols); r.err != nil {
		return
	}
	if !cols[fID].present() {
		r.fail(errors.New(`insert: row has no "id" value (is the column missing from event_outbox?)`))
		return
	}
	if err := checkBinary(rel, &cols); err != nil {
		r.fail(err)
		return
	}
	// Rows inserted as anything but pending (processed, failed, dead) belong to the
	// sweep or to nobody; the stream only delivers new events.
	if cols[fStatus].present() && string(textValue(cols[fStatus], rel.typ[fStatus])) != "pending" {
		m.Kind = KindIgnored
		return
	}
	m.Kind = KindInsert
	d.fillEvent(&m.Event, rel, &cols)
}

// checkBinary refuses a row with a value in binary format the decoder cannot
// read: the session asked for binary values although a column's type changed to
// one without a binary decoder (a new session, REPLICATION_BINARY auto, asks for
// text then), or a jsonb in a format version it does not know.
func checkBinary(rel *relation, cols *[numFields]column) error {
	for f := range cols {
		c := cols[f]
		if c.kind != 'b' {
			continue
		}
		if !binaryDecodable(f, rel.typ[f]) {
			return fmt.Errorf("%w: column %q (type oid %d) arrived in binary format", ErrBinaryType, fieldNames[f], rel.typ[f])
		}
		if rel.typ[f] == oidJSONB && (len(c.val) == 0 || c.val[0] != jsonbVersion) {
			return fmt.Errorf("%w: column %q: jsonb in a binary format other than version %d", ErrBinaryType, fieldNames[f], jsonbVersion)
		}
	}
	return nil
}

// column is one value of a row: its kind ('t' text, 'b' binary, 'n' NULL, 'u'
// unchanged TOAST; 0 when the relation has no such column) and its bytes, which
// point into the message.
type column struct {
	kind byte
	val  []byte
}

// present reports a value that is neither NULL nor missing.
func (c column) present() bool { return c.kind == 't' || c.kind == 'b' }

// readTuple reads the n columns of a row and keeps the outbox fields' values. It
// is the per-column loop of every row, so it reads the buffer directly, with the
// same bound checks as reader's methods.
func readTuple(r *reader, rel *relation, cols *[numFields]column) {
	n := int(r.u16())
	if r.err != nil {
		return
	}
	buf := r.buf
	for i := 0; i < n; i++ {
		if len(buf) == 0 {
			r.fail(fmt.Errorf("insert: row ends before column %d of %d", i, n))
			return
		}
		kind := buf[0]
		buf = buf[1:]
		var val []byte
		switch kind {
		case 'n', 'u':
		case 't', 'b':
			if len(buf) < 4 {
				r.fail(fmt.Errorf("insert: column %d: need 4 bytes, have %d", i, len(buf)))
				return
			}
			l := binary.BigEndian.Uint32(buf)
			buf = buf[4:]
			if uint64(l) > uint64(len(buf)) {
				r.fail(fmt.Errorf("insert: column %d: need %d bytes, have %d", i, l, len(buf)))
				return
			}
			val, buf = buf[:l:l], buf[l:]
		default:
			r.fail(fmt.Errorf("insert: column %d has unknown kind %q", i, kind))
			return
		}
		if i >= len(rel.field) || rel.field[i] < 0 {
			continue
		}
		cols[rel.field[i]] = column{kind: kind, val: val}
	}
	r.buf = buf
}

// fillEvent converts the columns of one row, text or binary.
func (d *Decoder) fillEvent(ev *record.Event, rel *relation, cols *[numFields]column) {
	if !d.inStream {
		ev.CommitLSN = d.txnCommitLSN
		ev.CommitTime = d.txnCommitTime
		ev.Xid = d.txnXid
	}
	id, ok := intValue(cols[fID], rel.typ[fID])
	if !ok {
		ev.Problem = fmt.Sprintf("id %s is not an integer", describe(cols[fID]))
	}
	ev.ID = id
	d.fillStrings(ev, rel, cols)

	problem := func(p string) {
		if ev.Problem == "" {
			ev.Problem = p
		}
	}
	if !cols[fType].present() || len(ev.Type) == 0 {
		problem("event_type is NULL or empty")
	}
	if !cols[fContext].present() {
		ev.Context = "{}" // a NULL context carries no data; keep the row deliverable
	}
	if c := cols[fMetadataVersion]; c.present() {
		v, ok := intValue(c, rel.typ[fMetadataVersion])
		if !ok {
			problem(fmt.Sprintf("metadata_version %s is not an integer", describe(c)))
		}
		ev.MetadataVersion = v
	}
	if c := cols[fTime]; !c.present() {
		problem("event_date_time is NULL")
	} else if t, err := d.timeValue(c, rel.typ[fTime]); err != nil {
		problem(fmt.Sprintf("event_date_time: %v", err))
	} else {
		ev.Time = t
	}
	if c := cols[fCreatedAt]; c.present() {
		if t, err := d.timeValue(c, rel.typ[fCreatedAt]); err != nil {
			problem(fmt.Sprintf("created_at: %v", err))
		} else {
			ev.CreatedAt = t
		}
	} else {
		ev.CreatedAt = ev.CommitTime
	}
}

// describe quotes a value for a problem message: text as it is, binary in hex.
func describe(c column) string {
	if c.kind == 'b' {
		return fmt.Sprintf("(binary %x)", c.val)
	}
	return fmt.Sprintf("%q", c.val)
}

// fillStrings copies the row's three string columns out of the message, whose
// buffer the next receive reuses, into the decoder's current string block.
func (d *Decoder) fillStrings(ev *record.Event, rel *relation, cols *[numFields]column) {
	typ := textValue(cols[fType], rel.typ[fType])
	env := textValue(cols[fEnvironment], rel.typ[fEnvironment])
	ctx := textValue(cols[fContext], rel.typ[fContext])
	total := len(typ) + len(env) + len(ctx)
	if total == 0 {
		return
	}
	buf := d.strings.alloc(total)
	copy(buf, typ)
	copy(buf[len(typ):], env)
	copy(buf[len(typ)+len(env):], ctx)
	s := unsafe.String(&buf[0], len(buf)) // buf is never written again
	a, b := len(typ), len(typ)+len(env)
	ev.Type, ev.Environment, ev.Context = s[:a], s[a:b], s[b:]
}

// stringBlock hands out the bytes of decoded strings from shared blocks: one
// allocation per block of rows instead of one per row. Bytes handed out are
// never written again, so strings may point into them; a block is freed once no
// event refers to it. Events of one block are decoded together and delivered
// together, so a block rarely outlives its rows by much.
type stringBlock struct {
	buf []byte
}

// stringBlockSize is small enough that an event kept long after its neighbours
// pins little memory, and large enough to hold many typical rows.
const stringBlockSize = 16 << 10

func (s *stringBlock) alloc(n int) []byte {
	if n > stringBlockSize/8 {
		return make([]byte, n) // a large value gets its own allocation
	}
	if cap(s.buf)-len(s.buf) < n {
		s.buf = make([]byte, 0, stringBlockSize)
	}
	start := len(s.buf)
	s.buf = s.buf[:start+n]
	return s.buf[start : start+n : start+n]
}

func pgTime(micros int64) time.Time {
	return postgresEpoch.Add(time.Duration(micros) * time.Microsecond)
}

// parseInt parses a decimal int64 without allocating.
func parseInt(b []byte) (int64, bool) {
	if len(b) == 0 || len(b) > 20 {
		return 0, false
	}
	neg := b[0] == '-'
	if neg {
		b = b[1:]
		if len(b) == 0 {
			return 0, false
		}
	}
	var n uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		next := n*10 + uint64(c-'0')
		if next/10 != n {
			return 0, false
		}
		n = next
	}
	if neg {
		if n > 1<<63 {
			return 0, false
		}
		return -int64(n), true
	}
	if n > 1<<63-1 {
		return 0, false
	}
	return int64(n), true
}

// reader reads big-endian protocol fields and records the first bound violation
// instead of panicking; after an error every read returns zero values.
type reader struct {
	buf []byte
	err error
}

func (r *reader) fail(err error) {
	if r.err == nil {
		r.err = err
	}
}

func (r *reader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > len(r.buf) {
		r.fail(fmt.Errorf("need %d bytes, have %d", n, len(r.buf)))
		return nil
	}
	b := r.buf[:n:n]
	r.buf = r.buf[n:]
	return b
}

func (r *reader) u8() byte {
	if b := r.take(1); b != nil {
		return b[0]
	}
	return 0
}

func (r *reader) u16() uint16 {
	if b := r.take(2); b != nil {
		return binary.BigEndian.Uint16(b)
	}
	return 0
}

func (r *reader) u32() uint32 {
	if b := r.take(4); b != nil {
		return binary.BigEndian.Uint32(b)
	}
	return 0
}

func (r *reader) u64() uint64 {
	if b := r.take(8); b != nil {
		return binary.BigEndian.Uint64(b)
	}
	return 0
}

func (r *reader) i64() int64 { return int64(r.u64()) }

func (r *reader) bytes(n int) []byte { return r.take(n) }

func (r *reader) cstring() string {
	if r.err != nil {
		return ""
	}
	for i, c := range r.buf {
		if c == 0 {
			s := string(r.buf[:i])
			r.buf = r.buf[i+1:]
			return s
		}
	}
	r.fail(errors.New("unterminated string"))
	return ""
}
