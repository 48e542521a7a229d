// Package config reads the streamer's settings from flags and environment variables
// (flags win), with defaults, and turns bad values into one clear line naming the
// setting. Only cmd/ uses it; the other packages take plain Config structs.
package config

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/outbox-streamer/outbox-streamer/internal/duration"
)

// flagError is a command line the flag set rejected (an unknown flag, a
// missing value), as opposed to a value that does not validate.
type flagError struct{ err error }

func (e flagError) Error() string { return e.err.Error() }
func (e flagError) Unwrap() error { return e.err }

// IsFlagError reports whether err is a command line the flags rejected.
func IsFlagError(err error) bool {
	var fe flagError
	return errors.As(err, &fe)
}

// setting is one configurable value, reachable as a flag and an environment variable.
type setting struct {
	env, flag, def, usage string
	secret                bool
	value                 string
	explicit              bool     // given by flag or environment
	isBool                bool     // a bare --flag means true
	emptyIsValue          bool     // NAME= (set but empty) is a value, not "unset"
	aliases               []string // other environment names, read when env is unset
	group                 string   // heading in the help
	apply                 func(string) error
}

// flagValue is a setting as a flag.Value; for booleans it is a bool flag, so
// that a bare `--debug` works.
type flagValue struct{ st *setting }

func (v flagValue) String() string {
	if v.st == nil {
		return ""
	}
	return v.st.value
}

func (v flagValue) Set(s string) error {
	v.st.value, v.st.explicit = s, true
	return nil
}

func (v flagValue) IsBoolFlag() bool { return v.st != nil && v.st.isBool }

// Source collects settings for one command.
type Source struct {
	fs        *flag.FlagSet
	lookupEnv func(string) (string, bool)
	settings  []*setting
	byEnv     map[string]*setting
	group     string // heading of the settings bound next
}

// NewSource returns a source over fs that reads the environment with lookupEnv
// (os.LookupEnv when nil).
func NewSource(fs *flag.FlagSet, lookupEnv func(string) (string, bool)) *Source {
	if lookupEnv == nil {
		lookupEnv = os.LookupEnv
	}
	s := &Source{fs: fs, lookupEnv: lookupEnv, byEnv: map[string]*setting{}}
	fs.Usage = func() { s.PrintUsage(fs.Output()) }
	return s
}

// Group names the heading under which the settings bound next are listed.
func (s *Source) Group(name string) { s.group = name }

func (s *Source) add(st *setting) {
	st.group = s.group
	s.settings = append(s.settings, st)
	s.byEnv[st.env] = st
	if st.flag != "" {
		s.fs.Var(flagValue{st}, st.flag, st.usage)
	}
}

// String binds a string setting.
func (s *Source) String(p *string, env, flagName, def, usage string) {
	s.add(&setting{env: env, flag: flagName, def: def, usage: usage, apply: func(v string) error { *p = v; return nil }})
}

// Disableable binds a string setting that an explicitly empty value turns off
// (NAME= in the environment, --flag= on the command line). For other settings
// an empty variable counts as unset, so that compose's ${NAME:-} keeps defaults.
func (s *Source) Disableable(p *string, env, flagName, def, usage string) {
	s.add(&setting{env: env, flag: flagName, def: def, usage: usage, emptyIsValue: true, apply: func(v string) error { *p = v; return nil }})
}

// Secret binds a string setting whose value is never printed.
func (s *Source) Secret(p *string, env, flagName, usage string) {
	s.add(&setting{env: env, flag: flagName, usage: usage, secret: true, apply: func(v string) error { *p = v; return nil }})
}

// Int binds an integer setting of at least min.
func (s *Source) Int(p *int, env, flagName string, def, min int, usage string) {
	s.add(&setting{env: env, flag: flagName, def: strconv.Itoa(def), usage: usage, apply: func(v string) error {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil || n < min {
			return fmt.Errorf("want an integer >= %d", min)
		}
		*p = n
		return nil
	}})
}

// Bool binds a boolean setting (true/false, 1/0, yes/no).
func (s *Source) Bool(p *bool, env, flagName string, def bool, usage string) {
	s.add(&setting{env: env, flag: flagName, def: strconv.FormatBool(def), usage: usage, isBool: true, apply: func(v string) error {
		switch strings.ToLower(strings.TrimSpace(v)) {
		case "1", "t", "true", "yes", "y", "on":
			*p = true
		case "0", "f", "false", "no", "n", "off", "":
			*p = false
		default:
			return fmt.Errorf("want true or false")
		}
		return nil
	}})
}

// Duration binds a duration setting. A bare number is seconds, as in the earlier
// service ("30"); Go durations ("250ms", "1m") work too.
func (s *Source) Duration(p *time.Duration, env, flagName string, def time.Duration, usage string) {
	s.add(&setting{env: env, flag: flagName, def: duration.Format(def), usage: usage, apply: func(v string) error {
		d, err := duration.Parse(v)
		if err != nil || d <= 0 {
			return fmt.Errorf(`want a positive duration such as "30", "30s" or "250ms"`)
		}
		*p = d
		return nil
	}})
}

// DurationOrZero is Duration where 0 is allowed and means "off".
func (s *Source) DurationOrZero(p *time.Duration, env, flagName string, def time.Duration, usage string) {
	s.add(&setting{env: env, flag: flagName, def: duration.Format(def), usage: usage, apply: func(v string) error {
		d, err := duration.Parse(v)
		if err != nil || d < 0 {
			return fmt.Errorf(`want a duration such as "7d", "36h" or "90s" (0 turns it off)`)
		}
		*p = d
		return nil
	}})
}

// Parse parses args and then applies, for every setting, the flag if given, else the
// environment variable if set, else the default. The first bad value is returned as
// one line naming the setting.
func (s *Source) Parse(args []string) error {
	if err := s.fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return flagError{err}
	}
	for _, st := range s.settings {
		v := st.value
		if !st.explicit {
			e, found, err := s.lookup(st)
			if err != nil {
				return err
			}
			if found {
				v, st.explicit = e, true
			} else {
				v = st.def
			}
			st.value = v
		}
		if err := st.apply(v); err != nil {
			shown := fmt.Sprintf("%q", v)
			if st.secret {
				shown = "(hidden)"
			}
			return fmt.Errorf("invalid %s: %s %s", st.name(), shown, err)
		}
	}
	return nil
}

// Alias lets the setting named env also be read from the environment
// variable alias (a name people already use), when env itself is unset.
func (s *Source) Alias(env, alias string) {
	st := s.byEnv[env]
	st.aliases = append(st.aliases, alias)
	s.byEnv[alias] = st
}

// lookup reads a setting from the environment: its name, then its aliases;
// a secret also from the file that NAME_FILE names (Docker and Kubernetes
// mount secrets as files), one trailing newline dropped.
func (s *Source) lookup(st *setting) (string, bool, error) {
	names := append([]string{st.env}, st.aliases...)
	for _, n := range names {
		if v, set := s.lookupEnv(n); v != "" || (set && st.emptyIsValue) {
			return v, true, nil
		}
	}
	if !st.secret {
		return "", false, nil
	}
	for _, n := range names {
		path, _ := s.lookupEnv(n + "_FILE")
		if path == "" {
			continue
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return "", false, fmt.Errorf("invalid %s_FILE: cannot read the secret: %w", n, err)
		}
		return strings.TrimSuffix(strings.TrimSuffix(string(data), "\n"), "\r"), true, nil
	}
	return "", false, nil
}

// Explicit reports whether the setting with this environment name was given by flag
// or environment rather than defaulted.
func (s *Source) Explicit(env string) bool {
	st, ok := s.byEnv[env]
	return ok && st.explicit
}

func (st *setting) name() string {
	if st.flag == "" {
		return st.env
	}
	return st.env + " (--" + st.flag + ")"
}

// PrintUsage lists every setting with its flag, environment variable and
// default, under its group's heading, then the command's own flags.
func (s *Source) PrintUsage(w io.Writer) { s.PrintUsageOf(w, nil) }

// PrintUsageOf is PrintUsage for the settings whose group or environment
// name is in only (every setting when only is nil).
func (s *Source) PrintUsageOf(w io.Writer, only []string) {
	var other []string
	s.fs.VisitAll(func(f *flag.Flag) {
		if _, ok := s.byFlag(f.Name); !ok {
			other = append(other, fmt.Sprintf("  --%s\t%s", f.Name, f.Usage))
		}
	})
	if len(other) > 0 {
		tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "Options:\n%s\n", strings.Join(other, "\n"))
		tw.Flush()
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "Settings (flag, environment variable, default; flags win):\n")
	var buf strings.Builder
	tw := tabwriter.NewWriter(&buf, 2, 4, 2, ' ', 0)
	group := ""
	for _, st := range s.settings {
		if only != nil && !slices.Contains(only, st.group) && !slices.Contains(only, st.env) {
			continue
		}
		if st.group != group && st.group != "" {
			group = st.group
			fmt.Fprintf(tw, " %s:\t\n", group)
		}
		flagName := "-"
		if st.flag != "" {
			flagName = "--" + st.flag
		}
		def := st.def
		if def == "" {
			def = `""`
		}
		if st.secret {
			def = "(secret)"
		}
		env := st.env
		for _, a := range st.aliases {
			env += " | " + a
		}
		if st.secret {
			env += " (or " + st.env + "_FILE)"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", flagName, env, def, st.usage)
	}
	tw.Flush()
	// A heading is a row of one cell (so that every group shares the columns);
	// drop the padding after it.
	for _, line := range strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n") {
		fmt.Fprintln(w, strings.TrimRight(line, " "))
	}
}

func (s *Source) byFlag(name string) (*setting, bool) {
	for _, st := range s.settings {
		if st.flag == name {
			return st, true
		}
	}
	return nil, false
}
