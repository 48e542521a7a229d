package localsvc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
)

// A local ClickHouse cluster for issue 16 (see docs/clickhouse-cluster.md).
//
// What can run here decides its shape:
//
//   - ClusterReplicated (the default): ZooKeeper 3.8 from Debian's
//     `zookeeper` package, run as a local process, and Debian's
//     clickhouse-server 18.16 nodes with <zookeeper>, <macros>,
//     <remote_servers>, <distributed_ddl> and an interserver port. Replicated
//     tables, ON CLUSTER DDL, Distributed tables, insert_quorum and
//     select_sequential_consistency work.
//   - ClusterSharded: ClickHouse 26.7 (chDB's clickhouse-local) nodes with
//     only <remote_servers>: Distributed tables over plain MergeTree shards,
//     no coordination service. chDB cannot be a replica (clickhouse-local sets
//     no interserver address, so Replicated tables stay read-only), runs no
//     DDL worker (ON CLUSTER is refused) and serves no Keeper.

// EnvZooKeeperJar names the ZooKeeper server jar, overriding
// /usr/share/java/zookeeper.jar.
const EnvZooKeeperJar = "OUTBOX_ZOOKEEPER_JAR"

// ClusterKind selects the servers a cluster is made of.
type ClusterKind int

const (
	// ClusterReplicated is ZooKeeper plus legacy (18.16) servers.
	ClusterReplicated ClusterKind = iota
	// ClusterSharded is modern (26.7) servers without coordination.
	ClusterSharded
)

func (k ClusterKind) String() string {
	if k == ClusterSharded {
		return "sharded (26.7, no replication)"
	}
	return "replicated (18.16 + ZooKeeper)"
}

// ClusterOptions configures StartCluster. The zero value is one shard of two
// 18.16 replicas coordinated by a local ZooKeeper.
type ClusterOptions struct {
	// Kind selects the servers; see ClusterKind.
	Kind ClusterKind
	// Shards and Replicas (per shard) give the topology. Defaults: for
	// ClusterReplicated 1 shard × 2 replicas, for ClusterSharded 2 shards ×
	// 1 replica (Replicas > 1 is refused there).
	Shards, Replicas int
	// Name is the cluster's name in <remote_servers>; default "outbox".
	Name string
	// BaseDir is where the cluster's directory is created; default
	// DefaultBaseDir().
	BaseDir string
	// StartTimeout bounds each server's start; default 30 s.
	StartTimeout time.Duration
	// Library and Launcher are passed to the modern servers (see
	// ClickHouseOptions).
	Library, Launcher string
	// Binary is the legacy clickhouse-server (see ClickHouseOptions).
	Binary string
	// ZooKeeperJar overrides $OUTBOX_ZOOKEEPER_JAR and
	// /usr/share/java/zookeeper.jar.
	ZooKeeperJar string
	// OnCrash is passed to every server, and called for ZooKeeper too.
	OnCrash func(*Crash)
}

// ClusterNode is one server of a cluster.
type ClusterNode struct {
	*ClickHouse
	// Shard and Replica number the node, from 1 (system.clusters' shard_num
	// and replica_num).
	Shard, Replica int
	// InterserverPort is the replication port (legacy nodes only).
	InterserverPort int
}

// Cluster is a set of ClickHouse servers that know each other as one
// cluster, and the ZooKeeper they use, if any.
type Cluster struct {
	// Name is the cluster's name for ON CLUSTER and Distributed(...).
	Name string
	// Kind, Shards and Replicas describe it.
	Kind             ClusterKind
	Shards, Replicas int
	// Nodes are shard by shard, replica by replica.
	Nodes []*ClusterNode
	// ZooKeeper is the coordination service (nil for ClusterSharded).
	ZooKeeper *ZooKeeper
	// Dir holds every node's directory and ZooKeeper's.
	Dir string

	mu      sync.Mutex
	stopped bool
}

// Addrs returns every node's native address, "127.0.0.1:port".
func (c *Cluster) Addrs() []string {
	out := make([]string, len(c.Nodes))
	for i, n := range c.Nodes {
		out[i] = n.Addr()
	}
	return out
}

// StartCluster starts a local cluster; see ClusterOptions. Stop it with Stop.
// A missing package is reported as an error wrapping ErrNotInstalled.
func StartCluster(ctx context.Context, opts ClusterOptions) (*Cluster, error) {
	if opts.Name == "" {
		opts.Name = "outbox"
	}
	switch opts.Kind {
	case ClusterReplicated:
		if opts.Shards == 0 {
			opts.Shards = 1
		}
		if opts.Replicas == 0 {
			opts.Replicas = 2
		}
	case ClusterSharded:
		if opts.Shards == 0 {
			opts.Shards = 2
		}
		if opts.Replicas == 0 {
			opts.Replicas = 1
		}
		if opts.Replicas != 1 {
			return nil, errors.New("cluster: the modern (chDB) servers cannot be replicas; use ClusterReplicated")
		}
	default:
		return nil, fmt.Errorf("cluster: unknown kind %d", opts.Kind)
	}
	if opts.Shards < 1 || opts.Replicas < 1 || opts.Shards*opts.Replicas < 2 {
		return nil, fmt.Errorf("cluster: %d shards × %d replicas is not a cluster", opts.Shards, opts.Replicas)
	}
	var (
		zkJar, chBin string
		err          error
	)
	if opts.Kind == ClusterReplicated {
		if zkJar, err = FindZooKeeper(opts.ZooKeeperJar); err != nil {
			return nil, err
		}
		if chBin, err = FindClickHouseLegacy(opts.Binary); err != nil {
			return nil, err
		}
	}
	var lastErr error
	for attempt := 1; attempt <= portAttempts; attempt++ {
		c, err := startClusterOnce(ctx, opts, zkJar, chBin)
		if err == nil {
			return c, nil
		}
		lastErr = err
		// Ports are picked before the servers bind them (every node's config
		// names every other node's port); another process may take one.
		if !errors.Is(err, errPortInUse) || ctx.Err() != nil {
			break
		}
	}
	return nil, lastErr
}

func startClusterOnce(ctx context.Context, opts ClusterOptions, zkJar, chBin string) (_ *Cluster, err error) {
	dir, err := newServiceDir(opts.BaseDir, "cluster")
	if err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	c := &Cluster{Name: opts.Name, Kind: opts.Kind, Shards: opts.Shards, Replicas: opts.Replicas, Dir: dir}
	defer func() {
		if err != nil {
			_ = c.Stop()
		}
	}()
	if opts.Kind == ClusterReplicated {
		c.ZooKeeper, err = StartZooKeeper(ctx, ZooKeeperOptions{
			Dir: filepath.Join(dir, "zookeeper"), Jar: zkJar, StartTimeout: opts.StartTimeout, OnCrash: opts.OnCrash,
		})
		if err != nil {
			return nil, fmt.Errorf("cluster: %w", err)
		}
	}
	// Every port first: each node's configuration lists all nodes.
	type ports struct{ tcp, http, inter int }
	used := map[int]bool{}
	pick := func() (int, error) {
		for {
			p, err := freePort()
			if err != nil {
				return 0, err
			}
			if !used[p] {
				used[p] = true
				return p, nil
			}
		}
	}
	all := make([]ports, opts.Shards*opts.Replicas)
	for i := range all {
		for _, p := range []*int{&all[i].tcp, &all[i].http, &all[i].inter} {
			if *p, err = pick(); err != nil {
				return nil, fmt.Errorf("cluster: %w", err)
			}
		}
	}
	var remote strings.Builder
	fmt.Fprintf(&remote, "    <remote_servers>\n        <%s>\n", opts.Name)
	for s := 0; s < opts.Shards; s++ {
		remote.WriteString("            <shard>\n")
		if opts.Replicas > 1 {
			// Replicated tables copy the data: the Distributed table writes
			// one replica per shard.
			remote.WriteString("                <internal_replication>true</internal_replication>\n")
		}
		for r := 0; r < opts.Replicas; r++ {
			fmt.Fprintf(&remote, "                <replica><host>127.0.0.1</host><port>%d</port></replica>\n", all[s*opts.Replicas+r].tcp)
		}
		remote.WriteString("            </shard>\n")
	}
	fmt.Fprintf(&remote, "        </%s>\n    </remote_servers>\n", opts.Name)

	for s := 1; s <= opts.Shards; s++ {
		for r := 1; r <= opts.Replicas; r++ {
			i := (s-1)*opts.Replicas + (r - 1)
			nodeDir := filepath.Join(dir, fmt.Sprintf("node-s%d-r%d", s, r))
			node := &ClusterNode{Shard: s, Replica: r}
			chOpts := ClickHouseOptions{
				Dir: nodeDir, TCPPort: all[i].tcp, HTTPPort: all[i].http,
				StartTimeout: opts.StartTimeout, OnCrash: opts.OnCrash,
			}
			if err := os.MkdirAll(nodeDir, 0o755); err != nil {
				return nil, fmt.Errorf("cluster: %w", err)
			}
			var start func(context.Context, ClickHouseOptions) (*ClickHouse, error)
			if opts.Kind == ClusterReplicated {
				node.InterserverPort = all[i].inter
				// clickhouse-server merges config.d/*.xml into the
				// configuration StartClickHouseLegacy writes.
				extra := legacyClusterConfig(remote.String(), c.ZooKeeper.Port, s, r, all[i].inter)
				if err := writeFile(filepath.Join(nodeDir, "config.d", "cluster.xml"), extra); err != nil {
					return nil, fmt.Errorf("cluster: %w", err)
				}
				chOpts.Binary = chBin
				start = StartClickHouseLegacy
			} else {
				// clickhouse-local reads ./config.xml, and the launcher runs
				// in the node's directory. The native port must be the
				// server's own (other nodes connect to it), so no shield.
				cfg := fmt.Sprintf("<clickhouse>\n    <macros><shard>%02d</shard><replica>r%d</replica></macros>\n%s</clickhouse>\n",
					s, r, remote.String())
				if err := writeFile(filepath.Join(nodeDir, "config.xml"), cfg); err != nil {
					return nil, fmt.Errorf("cluster: %w", err)
				}
				chOpts.Direct = true
				chOpts.Library, chOpts.Launcher = opts.Library, opts.Launcher
				start = StartClickHouse
			}
			ch, err := start(ctx, chOpts)
			if err != nil {
				return nil, fmt.Errorf("cluster: node shard %d replica %d: %w", s, r, err)
			}
			node.ClickHouse = ch
			c.Nodes = append(c.Nodes, node)
			if opts.Kind == ClusterReplicated {
				if err := waitZooKeeperSession(ctx, ch, chOpts.StartTimeout); err != nil {
					return nil, fmt.Errorf("cluster: node shard %d replica %d: %w", s, r, ch.withLogs(err))
				}
			}
		}
	}
	return c, nil
}

// waitZooKeeperSession waits until the node reads ZooKeeper. 18.16 opens its
// session lazily, and an ON CLUSTER query sent before the session exists
// crashed it here (SIGSEGV in zkutil::ZooKeeper::createImpl, 1 run in 5).
func waitZooKeeperSession(ctx context.Context, ch *ClickHouse, timeout time.Duration) error {
	if timeout == 0 {
		timeout = defaultStartTimeout
	}
	conn, err := clickhouse.Open(&clickhouse.Options{Addr: []string{ch.Addr()}, Protocol: clickhouse.Native, DialTimeout: 5 * time.Second})
	if err != nil {
		return err
	}
	defer conn.Close()
	return waitReady(ctx, ch.proc, timeout, func(ctx context.Context) error {
		// The DDL queue exists once a DDL worker has started.
		var n uint64
		if err := conn.QueryRow(ctx, "SELECT count() FROM system.zookeeper WHERE path = '/clickhouse/task_queue' AND name = 'ddl'").Scan(&n); err != nil {
			return err
		}
		if n == 0 {
			return errors.New("no DDL queue in ZooKeeper yet")
		}
		return nil
	})
}

// legacyClusterConfig is the config.d file of one 18.16 node.
func legacyClusterConfig(remote string, zkPort, shard, replica, interPort int) string {
	return fmt.Sprintf(`<?xml version="1.0"?>
<yandex>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <interserver_http_port>%[1]d</interserver_http_port>
    <zookeeper>
        <node><host>127.0.0.1</host><port>%[2]d</port></node>
        <session_timeout_ms>10000</session_timeout_ms>
    </zookeeper>
    <macros>
        <shard>%02[3]d</shard>
        <replica>r%[4]d</replica>
    </macros>
    <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
%[5]s</yandex>
`, interPort, zkPort, shard, replica, remote)
}

func writeFile(path, content string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, []byte(content), 0o644)
}

// Stop stops every node, then ZooKeeper, and removes the cluster's
// directory. It is safe to call more than once.
func (c *Cluster) Stop() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return nil
	}
	c.stopped = true
	var errs []error
	// Stop the nodes concurrently: each waits for its own shutdown.
	var wg sync.WaitGroup
	var emu sync.Mutex
	for _, n := range c.Nodes {
		wg.Add(1)
		go func(n *ClusterNode) {
			defer wg.Done()
			if err := n.Stop(); err != nil {
				emu.Lock()
				errs = append(errs, err)
				emu.Unlock()
			}
		}(n)
	}
	wg.Wait()
	if c.ZooKeeper != nil {
		errs = append(errs, c.ZooKeeper.Stop())
	}
	_ = os.RemoveAll(c.Dir)
	return errors.Join(errs...)
}

// ZooKeeperOptions configures StartZooKeeper.
type ZooKeeperOptions struct {
	// Dir is the service directory (data in Dir/data); default: a fresh one
	// under DefaultBaseDir(), removed on Stop.
	Dir string
	// Port is the client port; 0 picks a free one.
	Port int
	// Jar is the server jar; default FindZooKeeper("").
	Jar string
	// StartTimeout bounds the wait for "imok"; default 30 s.
	StartTimeout time.Duration
	// OnCrash is called when the server ends without Stop.
	OnCrash func(*Crash)
}

// ZooKeeper is a standalone ZooKeeper server (Debian's 3.8) run with java.
type ZooKeeper struct {
	// Port is the client port on 127.0.0.1.
	Port int
	// Dir is the service directory; LogPath the server's output.
	Dir, LogPath string

	ownsDir bool
	proc    *process
	mu      sync.Mutex
	stopped bool
}

// Addr returns "127.0.0.1:Port".
func (z *ZooKeeper) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(z.Port)) }

// FindZooKeeper returns the ZooKeeper server jar: jar if set, else
// $OUTBOX_ZOOKEEPER_JAR, else /usr/share/java/zookeeper.jar (Debian's
// libzookeeper-java), and checks that java is on PATH. The error wraps
// ErrNotInstalled and says what to install.
func FindZooKeeper(jar string) (string, error) {
	if jar == "" {
		jar = os.Getenv(EnvZooKeeperJar)
	}
	if jar == "" {
		jar = "/usr/share/java/zookeeper.jar"
	}
	if _, err := os.Stat(jar); err != nil {
		return "", fmt.Errorf("zookeeper jar %s not found (install it with `apt-get install -y zookeeper`): %w", jar, ErrNotInstalled)
	}
	if _, err := exec.LookPath("java"); err != nil {
		return "", fmt.Errorf("java not found (install it with `apt-get install -y zookeeper`, which pulls in a JRE): %w", ErrNotInstalled)
	}
	return jar, nil
}

// StartZooKeeper starts a standalone ZooKeeper on a loopback port. It runs as
// the current user (root is fine), logging to Dir/zookeeper.log.
func StartZooKeeper(ctx context.Context, opts ZooKeeperOptions) (*ZooKeeper, error) {
	jar, err := FindZooKeeper(opts.Jar)
	if err != nil {
		return nil, err
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = defaultStartTimeout
	}
	z := &ZooKeeper{Dir: opts.Dir}
	if z.Dir == "" {
		if z.Dir, err = newServiceDir("", "zookeeper"); err != nil {
			return nil, fmt.Errorf("zookeeper: %w", err)
		}
		z.ownsDir = true
	}
	dataDir := filepath.Join(z.Dir, "data")
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return nil, fmt.Errorf("zookeeper: %w", err)
	}
	z.LogPath = filepath.Join(z.Dir, "zookeeper.log")
	// slf4j-simple (from libslf4j-java, a dependency of the package) sends
	// the server's log to stderr, which goes to LogPath; without a binding
	// ZooKeeper logs nothing at all.
	cp := jar
	if _, err := os.Stat("/usr/share/java/slf4j-simple.jar"); err == nil {
		cp += ":/usr/share/java/slf4j-simple.jar"
	}
	for attempt := 1; ; attempt++ {
		z.Port = opts.Port
		if z.Port == 0 {
			if z.Port, err = freePort(); err != nil {
				break
			}
		}
		cfg := fmt.Sprintf("tickTime=500\ndataDir=%s\nclientPort=%d\nclientPortAddress=127.0.0.1\n"+
			"maxClientCnxns=0\nadmin.enableServer=false\n4lw.commands.whitelist=ruok,srvr,mntr\n"+
			"autopurge.purgeInterval=1\n", dataDir, z.Port)
		cfgPath := filepath.Join(z.Dir, "zoo.cfg")
		if err = os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
			break
		}
		cmd := exec.Command("java", "-Xms32m", "-Xmx256m", "-XX:+UseSerialGC",
			"-Dzookeeper.jmx.log4j.disable=true", "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
			"-cp", cp, "org.apache.zookeeper.server.ZooKeeperServerMain", cfgPath)
		cmd.Dir = z.Dir
		z.proc, err = startProcess(cmd, z.LogPath, syscall.SIGKILL)
		if err != nil {
			break
		}
		err = waitReady(ctx, z.proc, opts.StartTimeout, func(ctx context.Context) error {
			return zkRuok(ctx, z.Addr())
		})
		if err == nil {
			proc := z.proc
			proc.arm(func(exit error) {
				if opts.OnCrash != nil {
					opts.OnCrash(&Crash{Service: "zookeeper on " + z.Addr(), Pid: proc.cmd.Process.Pid,
						At: time.Now(), Status: exit.Error(), Log: tailFile(z.LogPath, logTailLines)})
				}
			})
			return z, nil
		}
		_ = z.proc.kill()
		logs := tailFile(z.LogPath, logTailLines)
		err = withLog(fmt.Errorf("zookeeper on port %d: %w", z.Port, err), z.LogPath)
		if opts.Port != 0 || attempt >= portAttempts || !strings.Contains(logs, "Address already in use") {
			break
		}
	}
	if z.ownsDir {
		_ = os.RemoveAll(z.Dir)
	}
	if strings.Contains(fmt.Sprint(err), "Address already in use") {
		err = fmt.Errorf("%w: %w", errPortInUse, err)
	}
	return nil, err
}

// zkRuok sends the "ruok" four-letter command and expects "imok".
func zkRuok(ctx context.Context, addr string) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if _, err := conn.Write([]byte("ruok")); err != nil {
		return err
	}
	b, err := io.ReadAll(io.LimitReader(conn, 16))
	if err != nil {
		return err
	}
	if string(b) != "imok" {
		return fmt.Errorf("ruok answered %q", b)
	}
	return nil
}

// Stop stops ZooKeeper (SIGTERM, then SIGKILL) and removes its directory if
// StartZooKeeper created it.
func (z *ZooKeeper) Stop() error {
	z.mu.Lock()
	defer z.mu.Unlock()
	if z.stopped || z.proc == nil {
		z.stopped = true
		return nil
	}
	z.stopped = true
	err := z.proc.stop(func() error { return z.proc.signal(syscall.SIGTERM) }, 10*time.Second)
	if z.ownsDir {
		_ = os.RemoveAll(z.Dir)
	}
	if err != nil {
		return fmt.Errorf("zookeeper: stop: %w", err)
	}
	return nil
}
