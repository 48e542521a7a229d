package localsvc

import (
	"bytes"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

const (
	// fatalPollInterval is how often watchFatal reads a server's new log lines.
	fatalPollInterval = 200 * time.Millisecond
	// fatalExitGrace is how long a server that logged a fatal error may take
	// to exit by itself before the harness kills it.
	fatalExitGrace = 3 * time.Second
	// maxExcerptLine bounds one quoted log line (ClickHouse's carry stack
	// traces on one line).
	maxExcerptLine = 600
)

// fatalScanner follows a ClickHouse log from where it ended when the server
// started, keeping what explains a crash: the first <Fatal> lines and the
// last <Error> line before them.
type fatalScanner struct {
	path string

	mu        sync.Mutex
	offset    int64
	partial   []byte // an incomplete last line, completed by the next read
	lastError string
	fatal     []string
}

func newFatalScanner(path string) *fatalScanner {
	s := &fatalScanner{path: path}
	if st, err := os.Stat(path); err == nil {
		s.offset = st.Size()
	}
	return s
}

// scan reads what was appended since the last call and reports whether a
// fatal line has been seen.
func (s *fatalScanner) scan() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	f, err := os.Open(s.path)
	if err != nil {
		return len(s.fatal) > 0
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() < s.offset {
		s.offset = 0 // rotated
	}
	if _, err := f.Seek(s.offset, io.SeekStart); err != nil {
		return len(s.fatal) > 0
	}
	data, err := io.ReadAll(io.LimitReader(f, 16<<20))
	if err != nil {
		return len(s.fatal) > 0
	}
	s.offset += int64(len(data))
	data = append(s.partial, data...)
	end := bytes.LastIndexByte(data, '\n')
	if end < 0 {
		s.partial = data
		return len(s.fatal) > 0
	}
	s.partial = append([]byte(nil), data[end+1:]...)
	for _, line := range strings.Split(string(data[:end]), "\n") {
		switch {
		case strings.Contains(line, "<Fatal>"):
			if len(s.fatal) < 6 {
				s.fatal = append(s.fatal, clip(line))
			}
		case strings.Contains(line, "<Error>") && len(s.fatal) == 0:
			s.lastError = clip(line)
		}
	}
	return len(s.fatal) > 0
}

// excerpt returns the lines that explain a crash, or the log's tail when
// there is no fatal line.
func (s *fatalScanner) excerpt() string {
	s.scan()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.fatal) == 0 {
		return "--- last lines of " + s.path + " ---\n" + tailFile(s.path, logTailLines)
	}
	var b strings.Builder
	b.WriteString("--- from " + s.path + " ---\n")
	if s.lastError != "" {
		b.WriteString(s.lastError + "\n")
	}
	b.WriteString(strings.Join(s.fatal, "\n"))
	return b.String()
}

func clip(line string) string {
	if len(line) > maxExcerptLine {
		return line[:maxExcerptLine] + " ..."
	}
	return line
}

// watchFatal watches a ClickHouse server's log while the process lives. A
// <Fatal> line means the server is gone even if the process is not: the
// 26.7 library build can hang after its fatal-signal handler with its
// listeners closed. Such a process gets a short grace to exit on its own and
// is then killed, so that the crash is reported at once (through the
// process's crash callback) and the server can be started again.
func watchFatal(proc *process, s *fatalScanner) {
	t := time.NewTicker(fatalPollInterval)
	defer t.Stop()
	for {
		select {
		case <-proc.done:
			return
		case <-t.C:
		}
		if !s.scan() {
			continue
		}
		if proc.wait(fatalExitGrace) {
			return
		}
		proc.killHung("logged a fatal error and hung (listeners gone, process alive); killed by the harness")
		return
	}
}
