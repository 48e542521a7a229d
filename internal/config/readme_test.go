package config

import (
	"flag"
	"os"
	"regexp"
	"strings"
	"testing"
)

// TestREADMEConfigurationTable keeps the README's table of settings true: one
// row per setting, with the setting's flag and default (the flag column used
// to be wrong for several settings).
func TestREADMEConfigurationTable(t *testing.T) {
	raw, err := os.ReadFile("../../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	text := string(raw)
	start := strings.Index(text, "| variable | flag | default | meaning |")
	if start < 0 {
		t.Fatal("README has no configuration table")
	}
	table := text[start:]
	table = table[:strings.Index(table, "\n\n")]
	rows := map[string][]string{}
	envCell := regexp.MustCompile("^`([A-Z_]+)`$")
	for _, line := range strings.Split(table, "\n")[2:] {
		cells := strings.Split(strings.Trim(line, "|"), "|")
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		m := envCell.FindStringSubmatch(cells[0])
		if m == nil {
			continue // a group heading
		}
		if _, dup := rows[m[1]]; dup {
			t.Errorf("README lists %s twice", m[1])
		}
		rows[m[1]] = cells
	}
	src := NewSource(flag.NewFlagSet("t", flag.ContinueOnError), nil)
	Bind(src, &Config{})
	for _, st := range src.settings {
		cells, ok := rows[st.env]
		if !ok {
			t.Errorf("README's configuration table lacks %s", st.env)
			continue
		}
		delete(rows, st.env)
		wantFlag := ""
		if st.flag != "" {
			wantFlag = "`--" + st.flag + "`"
		}
		if cells[1] != wantFlag {
			t.Errorf("README: %s has flag %q, the binary %q", st.env, cells[1], wantFlag)
		}
		switch {
		case st.secret:
			if !strings.HasPrefix(cells[2], "(secret)") {
				t.Errorf("README: %s is a secret, its default column says %q", st.env, cells[2])
			}
		case st.def != "" && !strings.HasPrefix(cells[2], "`"+st.def+"`"):
			t.Errorf("README: %s defaults to %q, the binary to %q", st.env, cells[2], st.def)
		}
	}
	for env := range rows {
		t.Errorf("README lists %s, which is not a setting", env)
	}
}
