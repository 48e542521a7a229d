package pgsql

import "testing"

func TestQuote(t *testing.T) {
	for in, want := range map[string]string{
		"slot":        "'slot'",
		"o'brien":     "'o''brien'",
		`back\slash`:  `'back\slash'`,
		"nul\x00byte": "'nulbyte'",
		"00000003-1F": "'00000003-1F'",
	} {
		if got := Literal(in); got != want {
			t.Errorf("Literal(%q) = %s, want %s", in, got, want)
		}
	}
	if got := Ident("public", `we"ird`); got != `"public"."we""ird"` {
		t.Errorf("Ident = %s", got)
	}
	if lsn, err := ParseLSN("16/B374D848"); err != nil || lsn != 0x16B374D848 {
		t.Errorf("ParseLSN = %x, %v", lsn, err)
	}
}
