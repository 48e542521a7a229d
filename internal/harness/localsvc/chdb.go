package localsvc

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/ebitengine/purego"
)

const (
	// CHDBPackage is the npm package (pinned) that carries libchdb.so.
	CHDBPackage = "@chdb/lib-linux-x64-gnu"
	// CHDBVersion is the pinned chDB release; it embeds ClickHouse 26.7.
	CHDBVersion = "26.7.3-stable.1"

	// EnvCHDBLib overrides the path of libchdb.so. It is also how the
	// launcher child learns which library to load.
	EnvCHDBLib = "OUTBOX_CHDB_LIB"
	// EnvCHDBLauncher, set to "1", turns any binary that calls
	// RunCHDBLauncherIfRequested into a clickhouse-local launcher.
	EnvCHDBLauncher = "OUTBOX_CHDB_LAUNCHER"
)

// launcherChecked records that RunCHDBLauncherIfRequested ran in this
// process, which is what makes re-executing os.Executable() as a launcher
// safe (otherwise the child would run the caller's main or its tests).
var launcherChecked atomic.Bool

// RunCHDBLauncherIfRequested must be called first thing in main (or
// TestMain) of every binary that starts a modern ClickHouse. When the
// environment has OUTBOX_CHDB_LAUNCHER=1, this process is the launcher child
// started by StartClickHouse: it loads libchdb.so, runs clickhouse-local with
// the process arguments and exits without returning. Otherwise it returns
// immediately.
func RunCHDBLauncherIfRequested() {
	launcherChecked.Store(true)
	if os.Getenv(EnvCHDBLauncher) != "1" {
		return
	}
	lib := os.Getenv(EnvCHDBLib)
	if lib == "" {
		lib = defaultCHDBPath()
	}
	code, err := runCHDB(lib, os.Args[1:])
	if err != nil {
		fmt.Fprintf(os.Stderr, "chdb launcher: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// runCHDB loads the library at lib and runs clickhouse-local's main with
// argv[0] = "clickhouse" and args. It returns an exit code and the error
// clickhouse-local reported, if any.
func runCHDB(lib string, args []string) (int, error) {
	handle, err := purego.Dlopen(lib, purego.RTLD_NOW|purego.RTLD_GLOBAL)
	if err != nil {
		return 1, fmt.Errorf("load %s: %w", lib, err)
	}
	var (
		queryCmdline  func(argc int32, argv unsafe.Pointer) uintptr
		resultError   func(res uintptr) string
		resultBuffer  func(res uintptr) *byte
		resultLength  func(res uintptr) uintptr
		destroyResult func(res uintptr)
	)
	purego.RegisterLibFunc(&queryCmdline, handle, "chdb_query_cmdline")
	purego.RegisterLibFunc(&resultError, handle, "chdb_result_error")
	purego.RegisterLibFunc(&resultBuffer, handle, "chdb_result_buffer")
	purego.RegisterLibFunc(&resultLength, handle, "chdb_result_length")
	purego.RegisterLibFunc(&destroyResult, handle, "chdb_destroy_query_result")

	// C strings live in Go memory that stays referenced (and Go's heap does
	// not move objects) until this process exits.
	all := append([]string{"clickhouse"}, args...)
	cstrs := make([][]byte, len(all))
	argv := make([]*byte, len(all)+1)
	for i, a := range all {
		cstrs[i] = append([]byte(a), 0)
		argv[i] = &cstrs[i][0]
	}
	res := queryCmdline(int32(len(all)), unsafe.Pointer(&argv[0]))
	runtime.KeepAlive(cstrs)
	runtime.KeepAlive(argv)
	if res == 0 {
		return 1, errors.New("chdb_query_cmdline returned no result")
	}
	defer destroyResult(res)
	if msg := resultError(res); msg != "" {
		return 1, errors.New(msg)
	}
	// In library mode query output is collected in the result instead of
	// being written to stdout; pass it on like clickhouse-local would.
	if n := resultLength(res); n > 0 {
		buf := unsafe.Slice(resultBuffer(res), int(n))
		_, _ = os.Stdout.Write(buf)
	}
	return 0, nil
}

// defaultCHDBPath is where EnsureCHDB keeps the library:
// $XDG_CACHE_HOME (or ~/.cache)/outbox-streamer/chdb/VERSION/libchdb.so.
func defaultCHDBPath() string {
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = filepath.Join(os.TempDir(), "outbox-streamer-cache")
	}
	return filepath.Join(cache, "outbox-streamer", "chdb", CHDBVersion, "libchdb.so")
}

// EnsureCHDB returns the path of libchdb.so, downloading it first if needed.
// OUTBOX_CHDB_LIB, when set, names the library and nothing is downloaded.
// Otherwise the library is cached at $XDG_CACHE_HOME (or
// ~/.cache)/outbox-streamer/chdb/26.7.3-stable.1/libchdb.so; a missing one is
// fetched with `npm pack` (178 MB, about 570 MB unpacked). A lock file keeps
// concurrent processes from downloading it twice.
func EnsureCHDB(ctx context.Context) (string, error) {
	if p := os.Getenv(EnvCHDBLib); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("%s=%s: %w", EnvCHDBLib, p, err)
		}
		return p, nil
	}
	target := defaultCHDBPath()
	if st, err := os.Stat(target); err == nil && st.Size() > 0 {
		return target, nil
	}
	dir := filepath.Dir(target)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create chdb cache dir: %w", err)
	}
	unlock, err := lockFile(ctx, target+".lock")
	if err != nil {
		return "", err
	}
	defer unlock()
	// Another process may have finished the download while we waited.
	if st, err := os.Stat(target); err == nil && st.Size() > 0 {
		return target, nil
	}
	if err := downloadCHDB(ctx, target); err != nil {
		return "", err
	}
	return target, nil
}

// lockFile takes an exclusive flock on path, polling so that ctx can cancel
// the wait (a blocking flock cannot be interrupted).
func lockFile(ctx context.Context, path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock file: %w", err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() {
				_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
				f.Close()
			}, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("wait for lock %s (another process is downloading chDB): %w", path, ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// downloadCHDB fetches the pinned npm package with `npm pack` (which checks
// the registry's integrity hash) and extracts package/libchdb.so to target
// through a temporary file, so that target only ever holds a complete copy.
func downloadCHDB(ctx context.Context, target string) error {
	npm, err := exec.LookPath("npm")
	if err != nil {
		return fmt.Errorf("chDB library missing at %s and npm not found (apt-get install -y npm, or set %s): %w",
			target, EnvCHDBLib, ErrNotInstalled)
	}
	// Work next to the target so that the final rename stays on one file system.
	work, err := os.MkdirTemp(filepath.Dir(target), "download-")
	if err != nil {
		return fmt.Errorf("create download dir: %w", err)
	}
	defer os.RemoveAll(work)

	spec := CHDBPackage + "@" + CHDBVersion
	// A private npm cache avoids keeping a second 178 MB copy in ~/.npm.
	cmd := exec.CommandContext(ctx, npm, "pack", "--silent", "--cache", filepath.Join(work, "npm-cache"), spec)
	cmd.Dir = work
	stop := reportDownload(work, spec)
	out, err := cmd.CombinedOutput()
	stop()
	if err != nil {
		return fmt.Errorf("npm pack %s: %w\n%s", spec, err, out)
	}
	tgzs, _ := filepath.Glob(filepath.Join(work, "*.tgz"))
	if len(tgzs) != 1 {
		return fmt.Errorf("npm pack %s: expected one .tgz in %s, found %d\n%s", spec, work, len(tgzs), out)
	}
	tmp := filepath.Join(work, "libchdb.so")
	if err := extractFromTarGz(tgzs[0], "package/libchdb.so", tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, target); err != nil {
		return fmt.Errorf("install %s: %w", target, err)
	}
	return nil
}

// CHDBProgress, when not nil, receives a line every few seconds while the
// chDB library downloads (178 MB: minutes on a slow link, and `npm pack`
// itself prints nothing until it is done). outbox-devenv sets it to stderr;
// tests leave it nil.
var CHDBProgress io.Writer

// chdbTarballBytes is the size of the pinned package's tarball, for "N of
// about M MB".
const chdbTarballBytes = 178 << 20

// downloadProgressEvery is the time between progress lines.
const downloadProgressEvery = 5 * time.Second

// reportDownload writes to CHDBProgress, until stop is called, how many
// bytes npm has written under dir (its cache and the tarball). It returns
// at once when CHDBProgress is nil.
func reportDownload(dir, spec string) (stop func()) {
	w := CHDBProgress
	if w == nil {
		return func() {}
	}
	start := time.Now()
	fmt.Fprintf(w, "outbox-devenv: downloading %s (about %d MB) with npm pack\n", spec, chdbTarballBytes>>20)
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(downloadProgressEvery)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				n := min(dirBytes(dir), chdbTarballBytes)
				fmt.Fprintf(w, "outbox-devenv: downloading chDB: %d of about %d MB (%s)\n", n>>20, chdbTarballBytes>>20, time.Since(start).Round(time.Second))
			}
		}
	}()
	return func() {
		close(done)
		<-finished
		fmt.Fprintf(w, "outbox-devenv: downloaded chDB in %s; unpacking libchdb.so\n", time.Since(start).Round(time.Second))
	}
}

// dirBytes sums the sizes of the files under dir (errors count as nothing:
// npm renames its temporary files while the walk runs).
func dirBytes(dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if info, err := d.Info(); err == nil {
				n += info.Size()
			}
		}
		return nil
	})
	return n
}

// extractFromTarGz copies the member name of the gzipped tar archive to dst.
func extractFromTarGz(archive, name, dst string) error {
	f, err := os.Open(archive)
	if err != nil {
		return fmt.Errorf("open %s: %w", archive, err)
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		return fmt.Errorf("read %s: %w", archive, err)
	}
	tr := tar.NewReader(gz)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("%s has no %s", archive, name)
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", archive, err)
		}
		if hdr.Name != name {
			continue
		}
		out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o755)
		if err != nil {
			return fmt.Errorf("create %s: %w", dst, err)
		}
		if _, err := io.Copy(out, tr); err != nil {
			out.Close()
			return fmt.Errorf("extract %s: %w", name, err)
		}
		if err := out.Sync(); err != nil {
			out.Close()
			return fmt.Errorf("sync %s: %w", dst, err)
		}
		if err := out.Close(); err != nil {
			return fmt.Errorf("close %s: %w", dst, err)
		}
		return nil
	}
}
