package metrics

import (
	"context"
	"fmt"
	"math"
	"time"

	"github.com/jackc/pglogrepl"
	"go.uber.org/zap"
)

// ProgressConfig tunes the leader's progress line.
type ProgressConfig struct {
	// Interval is the time between lines (PROGRESS_INTERVAL); 0 turns them off.
	Interval time.Duration
	// BehindRows: with more pending rows than this the leader is catching up
	// (the line says how many are left and when it expects to be done).
	// Pending rows within one insert are normal while events arrive.
	BehindRows float64
	// Publish, when set, receives each line's View, for `status` to read
	// (the leader's own view); its errors are the publisher's to report.
	Publish func(context.Context, View)
}

// View is what the leader's progress line says, for `status`.
type View struct {
	// State is "catching up", "caught up" or "streaming".
	State             string    `json:"state"`
	RowsPerSecond     float64   `json:"rows_per_second"`
	Delivered         float64   `json:"delivered_total"`
	ConfirmedLSN      string    `json:"confirmed_lsn"`
	LagBytes          *float64  `json:"lag_bytes,omitempty"`
	Pending           float64   `json:"pending"`
	Failed            float64   `json:"failed"`
	Dead              float64   `json:"dead"`
	OldestUndelivered float64   `json:"oldest_undelivered_seconds"`
	ETASeconds        *float64  `json:"eta_seconds,omitempty"`
	LastBatch         time.Time `json:"last_batch,omitzero"`
	Errors            float64   `json:"errors_total"`
}

// Progress logs, every Interval while this process leads, one line of what
// it does: rows per second, the acknowledged LSN, the slot's lag, the
// outbox's pending and failed rows and the oldest undelivered row's age. While
// more than BehindRows rows are pending the line is "catching up: N left,
// ETA", and the first line after that is "caught up". Between lines nothing
// is logged per batch: a log is read by people, and metrics have the detail.
type Progress struct {
	cfg     ProgressConfig
	m       *Metrics
	log     *zap.Logger
	leading func() bool
	poll    func(context.Context) error

	last   Snapshot  // at the previous tick
	lastAt time.Time // zero before the first tick
	behind bool      // the previous line said "catching up"
}

// NewProgress returns the reporter over m. leading reports whether this
// process is the leader (only the leader's progress means anything); poll,
// when not nil, refreshes the slot's and the outbox's state before each line
// (SlotPoller.Poll), so that the line does not show them an interval old.
func NewProgress(cfg ProgressConfig, m *Metrics, log *zap.Logger, leading func() bool, poll func(context.Context) error) *Progress {
	return &Progress{cfg: cfg, m: m, log: log.Named("progress"), leading: leading, poll: poll}
}

// Run logs a line every Interval until ctx ends. It returns at once when
// Interval is 0.
func (p *Progress) Run(ctx context.Context) {
	if p.cfg.Interval <= 0 {
		return
	}
	t := time.NewTicker(p.cfg.Interval)
	defer t.Stop()
	p.last, p.lastAt = p.m.Snapshot(), time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !p.leading() {
			// A standby's rate would be the old leader's history: start
			// over when this process leads.
			p.last, p.lastAt, p.behind = p.m.Snapshot(), time.Now(), false
			continue
		}
		if p.poll != nil {
			_ = p.poll(ctx) // the poller logs its own failures; the line shows what is known
		}
		v := p.Report(p.m.Snapshot(), time.Now())
		if p.cfg.Publish != nil {
			p.cfg.Publish(ctx, v)
		}
	}
}

// Report writes the line for s, taken at now, against the previous one, and
// returns what it said.
func (p *Progress) Report(s Snapshot, now time.Time) View {
	rate := 0.0
	if !p.lastAt.IsZero() && now.After(p.lastAt) {
		rate = (s.Delivered - p.last.Delivered) / now.Sub(p.lastAt).Seconds()
	}
	p.last, p.lastAt = s, now
	fields := []zap.Field{
		zap.Float64("rows_per_second", math.Round(rate*10)/10),
		zap.String("confirmed_lsn", pglogrepl.LSN(s.AckedLSN).String()),
	}
	lag := "unknown"
	if s.LagBytes != nil {
		lag = Bytes(*s.LagBytes)
		fields = append(fields, zap.Int64("lag_bytes", int64(*s.LagBytes)))
	}
	if s.OutboxRead {
		fields = append(fields, zap.Int64("pending", int64(s.Pending)), zap.Int64("failed", int64(s.Failed)),
			zap.Int64("dead", int64(s.Dead)), zap.Duration("oldest_undelivered", s.OldestUndelivered.Round(time.Second)))
	}
	v := View{State: "streaming", RowsPerSecond: math.Round(rate*10) / 10, Delivered: s.Delivered,
		ConfirmedLSN: pglogrepl.LSN(s.AckedLSN).String(), LagBytes: s.LagBytes, Pending: s.Pending, Failed: s.Failed,
		Dead: s.Dead, OldestUndelivered: s.OldestUndelivered.Seconds(), LastBatch: s.LastBatch, Errors: s.Errors}
	behind := s.OutboxRead && s.Pending > p.cfg.BehindRows
	switch {
	case behind:
		v.State = "catching up"
		eta := "unknown" // nothing delivered in the last interval
		if rate > 0 {
			d := time.Duration(s.Pending / rate * float64(time.Second)).Round(time.Second)
			eta = d.String()
			fields = append(fields, zap.Duration("eta", d))
			secs := d.Seconds()
			v.ETASeconds = &secs
		}
		p.log.Info(fmt.Sprintf("catching up: %d left, ETA %s", int64(s.Pending), eta), fields...)
	case p.behind:
		v.State = "caught up"
		p.log.Info(fmt.Sprintf("caught up: %d pending, lag %s", int64(s.Pending), lag), fields...)
	default:
		p.log.Info(fmt.Sprintf("progress: %.0f rows/s, lag %s", rate, lag), fields...)
	}
	p.behind = behind
	return v
}

// Bytes writes a size the way a person reads it: 512 B, 1.5 KiB, 45.0 MiB.
func Bytes(n float64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", n/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", n/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", n/(1<<10))
	}
	return fmt.Sprintf("%.0f B", n)
}
