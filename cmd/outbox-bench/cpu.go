package main

import (
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// CPU accounting from /proc: where the machine's CPU time goes during a timed
// window, by component. It needs the servers to be children of this process (the
// bench starts them); otherwise only "streamer" and "bench" are known.

const clockTicks = 100 // USER_HZ on Linux

// Components the CPU time is split into.
var cpuGroups = []string{"streamer", "pg_walsender", "pg_backends", "pg_other", "clickhouse", "bench"}

type procStat struct {
	pid, ppid  int
	ticks      uint64 // utime + stime
	childTicks uint64 // cutime + cstime (reaped children)
	cmdline    string
}

func readProcStat(pid int) (procStat, bool) {
	dir := filepath.Join("/proc", strconv.Itoa(pid))
	data, err := os.ReadFile(filepath.Join(dir, "stat"))
	if err != nil {
		return procStat{}, false
	}
	s := string(data)
	// The command name is in parentheses and may contain spaces.
	end := strings.LastIndexByte(s, ')')
	if end < 0 {
		return procStat{}, false
	}
	f := strings.Fields(s[end+1:])
	// After ")": state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
	if len(f) < 15 {
		return procStat{}, false
	}
	num := func(i int) uint64 { v, _ := strconv.ParseUint(f[i], 10, 64); return v }
	p := procStat{pid: pid, ppid: int(num(1)), ticks: num(11) + num(12), childTicks: num(13) + num(14)}
	if cl, err := os.ReadFile(filepath.Join(dir, "cmdline")); err == nil {
		p.cmdline = strings.TrimSpace(strings.ReplaceAll(string(cl), "\x00", " "))
	}
	return p, true
}

func allProcs() map[int]procStat {
	out := map[int]procStat{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return out
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if p, ok := readProcStat(pid); ok {
			out[pid] = p
		}
	}
	return out
}

// cpuSample is the CPU seconds consumed so far per process, classified.
type cpuSample struct {
	at         time.Time
	procs      map[int]procStat
	group      map[int]string
	postmaster int
}

// cpuMeter knows which processes are which.
type cpuMeter struct {
	streamerPID int // 0 when the pipeline runs in-process
}

// sample reads every process and classifies the ones that matter.
func (m *cpuMeter) sample() cpuSample {
	s := cpuSample{at: time.Now(), procs: allProcs(), group: map[int]string{}}
	self := os.Getpid()
	children := map[int][]int{}
	for pid, p := range s.procs {
		children[p.ppid] = append(children[p.ppid], pid)
	}
	var mark func(pid int, g string)
	mark = func(pid int, g string) {
		s.group[pid] = g
		for _, c := range children[pid] {
			mark(c, g)
		}
	}
	s.group[self] = "bench"
	for _, pid := range children[self] {
		p := s.procs[pid]
		switch {
		case pid == m.streamerPID:
			mark(pid, "streamer")
		case strings.HasSuffix(strings.Fields(p.cmdline + " x")[0], "postgres"):
			s.group[pid] = "pg_other" // the postmaster
			s.postmaster = pid
			for _, c := range children[pid] {
				switch cl := s.procs[c].cmdline; {
				case strings.Contains(cl, "walsender"):
					s.group[c] = "pg_walsender"
				case strings.HasPrefix(cl, "postgres: postgres "):
					s.group[c] = "pg_backends"
				default:
					s.group[c] = "pg_other"
				}
			}
		case strings.Contains(p.cmdline, "--query") && strings.Contains(p.cmdline, "--tcp_port"):
			mark(pid, "clickhouse") // the chDB launcher
		}
	}
	return s
}

// cpuUse is CPU seconds per group over a window, and the window's length.
type cpuUse struct {
	Seconds map[string]float64 `json:"cpu_seconds"`
	Wall    float64            `json:"wall_seconds"`
}

// Cores is the average number of cores a group kept busy.
func (u cpuUse) Cores(g string) float64 {
	if u.Wall <= 0 {
		return 0
	}
	return u.Seconds[g] / u.Wall
}

// since computes the CPU used between an earlier sample a and s. Processes that
// appeared count from zero; the postmaster's reaped children count as pg_other.
func (s cpuSample) since(a cpuSample) cpuUse {
	u := cpuUse{Seconds: map[string]float64{}, Wall: s.at.Sub(a.at).Seconds()}
	for pid, g := range s.group {
		p := s.procs[pid]
		d := float64(p.ticks)
		if old, ok := a.procs[pid]; ok && old.ticks <= p.ticks {
			d -= float64(old.ticks)
			if pid == s.postmaster && old.childTicks <= p.childTicks {
				d += float64(p.childTicks - old.childTicks)
			}
		}
		u.Seconds[g] += d / clockTicks
	}
	return u
}

// summary formats the busiest groups as "streamer 0.62, pg_walsender 0.41, ...".
func (u cpuUse) summary() string {
	type kv struct {
		g string
		c float64
	}
	var list []kv
	total := 0.0
	for _, g := range cpuGroups {
		if c := u.Cores(g); c >= 0.005 {
			list = append(list, kv{g, c})
			total += c
		}
	}
	sort.SliceStable(list, func(i, j int) bool { return list[i].c > list[j].c })
	parts := make([]string, 0, len(list)+1)
	for _, e := range list {
		parts = append(parts, e.g+" "+strconv.FormatFloat(e.c, 'f', 2, 64))
	}
	parts = append(parts, "total "+strconv.FormatFloat(total, 'f', 2, 64))
	return strings.Join(parts, ", ")
}
