//! The scale figure (issue #15): as many concurrent connections to one server as its fd limit
//! allows, held by client processes (this binary re-executed as `scale-client`), each from its
//! own range of loopback source addresses when the ephemeral ports of one would run out.
//!
//! Phases, against one freshly started server: establish them all (timed from "go" until the
//! server's fd count is up by all of them); RSS and kernel slab per connection; PING round
//! trips on random connections while all are held; the same while 1 % of them run pipelined
//! ECHO; then every client closes all its sockets at once and the server's release is timed
//! until its fd count is back where it started, and its CLOSE_WAIT sockets are counted.

use std::io::{self, BufRead, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use closewait::service::{PING, PING_REPLY};
use closewait::testing::procfs;
use hdrhistogram::Histogram;

use super::load::Driver;
use super::server::rss_bytes;

/// fds a client process keeps for itself (stdio, epoll, pipes) below its hard limit.
const CLIENT_FD_RESERVE: u64 = 64;
/// Ports of one source address left unused: TIME_WAIT sockets of earlier figures, other users.
const PORT_MARGIN: usize = 2_000;
/// Pipelined ECHOs in flight on each active connection, and their size.
const ACTIVE_DEPTH: usize = 16;
const ACTIVE_PAYLOAD: usize = 64;
/// How long one answer from a client process may take (connecting 10,000 sockets included).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// How many connections, and why not more.
#[derive(Clone, Debug)]
pub struct Sizing {
    /// Connections to hold.
    pub conns: usize,
    /// Which limit set `conns`.
    pub limited_by: String,
    /// Client processes, and connections per client process at most.
    pub clients: usize,
    /// Connections per source address at most (127.0.0.2, 127.0.0.3, ...).
    pub per_addr: usize,
}

impl Sizing {
    /// Size the figure from this machine's limits: the hard RLIMIT_NOFILE (a server gets at
    /// most that, less closewait's reserve), `fs.file-max` (both ends of every connection are
    /// files), the ephemeral port range (per source address), and `requested` if given.
    pub fn probe(requested: Option<usize>) -> io::Result<Sizing> {
        let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
        let file_max = read_number("/proc/sys/fs/file-max").unwrap_or(u64::MAX);
        let ports = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|t| {
                let mut it = t.split_whitespace().map(|v| v.parse::<usize>().ok());
                Some(it.next()??..=it.next()??)
            })
            .map_or(28_232, |r| r.count());
        Ok(Sizing::from_limits(hard, file_max, ports, requested))
    }

    /// [`Sizing::probe`] from given limits: the hard RLIMIT_NOFILE, `fs.file-max`, ephemeral
    /// ports per source address, and the connections asked for.
    fn from_limits(hard: u64, file_max: u64, ports: usize, requested: Option<usize>) -> Sizing {
        // What closewait's own budget allows under that limit with one worker and stdio open.
        let server_max = closewait::testing::limits::derive_budget(hard, 3, 1, None)
            .map(|b| b.max_connections)
            .unwrap_or(0);
        let by_files = usize::try_from(file_max.saturating_sub(10_000) / 2).unwrap_or(usize::MAX);
        let (mut conns, mut limited_by) = (
            server_max,
            format!(
                "the server's hard RLIMIT_NOFILE ({hard}; closewait's cap under it: {server_max})"
            ),
        );
        if by_files < conns {
            (conns, limited_by) = (by_files, format!("fs.file-max ({file_max}) for both ends"));
        }
        if let Some(n) = requested {
            if n <= conns {
                (conns, limited_by) = (n, "--conns".to_string());
            }
        }
        let per_client =
            usize::try_from(hard.saturating_sub(CLIENT_FD_RESERVE).max(1)).unwrap_or(usize::MAX);
        Sizing {
            conns,
            limited_by,
            // At least two, so the spreading over processes is exercised on every run.
            clients: conns.div_ceil(per_client).max(2).min(conns.max(1)),
            per_addr: ports.saturating_sub(PORT_MARGIN).max(1),
        }
    }

    /// Lower `conns` to closewait's own cap (`max_connections` from STATS) if that is
    /// smaller: the fds it has open at start are counted by the server, not guessed here.
    pub fn fit_to(&mut self, cap: usize) {
        if cap < self.conns {
            self.conns = cap;
            self.limited_by = format!("closewait's cap under the hard RLIMIT_NOFILE ({cap})");
        }
    }

    /// Source addresses needed.
    pub fn addrs(&self) -> usize {
        self.conns.div_ceil(self.per_addr)
    }
}

/// `max_connections` from a STATS request to closewait at `addr`.
pub fn closewait_cap(addr: SocketAddr) -> io::Result<usize> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(&[0, 0, 0, 1, closewait::service::STATS])?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body)?;
    String::from_utf8_lossy(body.get(1..).unwrap_or_default())
        .lines()
        .find_map(|l| l.strip_prefix("max_connections "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no max_connections in STATS"))
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Kernel slab memory (`Slab:` of /proc/meminfo) in bytes.
fn slab_bytes() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| io::Error::other("no Slab in /proc/meminfo"))
}

/// One client process and its line protocol (see [`client`]).
struct Client {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Client {
    fn spawn(server: SocketAddr, from: usize, count: usize, per_addr: usize) -> io::Result<Client> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["scale-client", "--server", &server.to_string()])
            .args(["--from", &from.to_string(), "--count", &count.to_string()])
            .args(["--per-addr", &per_addr.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        super::server::die_with_parent(&mut cmd);
        let mut child = cmd.spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other("no pipes to the client"));
        };
        // A line at a time on a thread, so a stuck client costs a timeout, not a hang.
        let lines = super::server::lines_of(stdout);
        Ok(Client {
            child,
            stdin,
            lines,
        })
    }

    fn send(&mut self, command: &str) -> io::Result<()> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()
    }

    /// The next line, which must start with `word`; the rest of it.
    fn expect(&self, word: &str) -> io::Result<String> {
        let line = self.lines.recv_timeout(CLIENT_TIMEOUT).map_err(|_| {
            io::Error::other(format!("a client process did not answer `{word}` in time"))
        })?;
        line.strip_prefix(word)
            .map(|rest| rest.trim().to_string())
            .ok_or_else(|| io::Error::other(format!("client: expected {word}, got {line:?}")))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // EOF on stdin ends it; kill if it is stuck.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU counters for "was anything else busy": the machine, the server, this process and the
/// clients (whose CPU is theirs, not other load).
struct CpuSnapshot {
    at: Instant,
    machine: f64,
    ours: f64,
}

fn cpu_snapshot(pid: u32, clients: &[Client]) -> io::Result<CpuSnapshot> {
    let mut ours = super::server::cpu_split(pid)?.total() + super::server::own_cpu_seconds()?;
    for c in clients {
        ours += super::server::cpu_split(c.child.id())?.total();
    }
    Ok(CpuSnapshot {
        at: Instant::now(),
        machine: super::server::machine_busy_seconds()?,
        ours,
    })
}

impl CpuSnapshot {
    /// Cores busy with work none of ours was charged for, since `before`.
    fn other_since(&self, before: &CpuSnapshot) -> f64 {
        let secs = self.at.duration_since(before.at).as_secs_f64().max(1e-9);
        ((self.machine - before.machine) - (self.ours - before.ours)).max(0.0) / secs
    }
}

fn record(h: &mut Histogram<u64>, rest: &str) {
    for v in rest
        .split_whitespace()
        .filter_map(|v| v.parse::<u64>().ok())
    {
        h.saturating_record(v.max(1));
    }
}

fn new_hist() -> io::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| io::Error::other(e.to_string()))
}

fn push_latency(m: &mut Vec<(&'static str, f64)>, h: &Histogram<u64>, keys: [&'static str; 3]) {
    if h.is_empty() {
        return;
    }
    m.push((keys[0], h.value_at_quantile(0.5) as f64));
    m.push((keys[1], h.value_at_quantile(0.99) as f64));
    m.push((keys[2], h.max() as f64));
}

/// Wait until `done` holds, checking every 10 ms, at most `limit`.
fn wait_until(limit: Duration, mut done: impl FnMut() -> io::Result<bool>) -> io::Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Run the scale figure against the running server `pid` at `addr`.
pub fn measure(
    addr: SocketAddr,
    pid: u32,
    sizing: &Sizing,
    pings: usize,
    active_for: Duration,
) -> io::Result<Vec<(&'static str, f64)>> {
    let n = sizing.conns;
    let per_client = n.div_ceil(sizing.clients);
    let mut clients = Vec::with_capacity(sizing.clients);
    let mut from = 0;
    while from < n {
        let count = per_client.min(n - from);
        clients.push(Client::spawn(addr, from, count, sizing.per_addr)?);
        from += count;
    }
    for c in &clients {
        c.expect("ready")?;
    }
    std::thread::sleep(Duration::from_millis(200));
    let fds_before = procfs::open_fds(pid)?;
    let rss_before = rss_bytes(pid)?;
    let slab_before = slab_bytes()?;
    let cpu_before = cpu_snapshot(pid, &clients)?;

    // Establish: every client connects its share at once; done when the server holds them
    // all. The fd count is read only once the clients are through: a read of /proc/PID/fd
    // costs ~1 µs per fd, CPU the clients would lose.
    let go = Instant::now();
    for c in &mut clients {
        c.send("connect")?;
    }
    for c in &clients {
        c.expect("connected")?;
    }
    let all_in = wait_until(Duration::from_secs(30), || {
        Ok(procfs::open_fds(pid)? >= fds_before + n)
    })?;
    let established = go.elapsed().as_secs_f64();
    let read_started = Instant::now();
    let fds_held = procfs::open_fds(pid)?;
    let fd_read_ms = read_started.elapsed().as_secs_f64() * 1e3;
    if !all_in {
        return Err(io::Error::other(format!(
            "the server holds {} of {n} connections 30 s after the clients connected",
            fds_held.saturating_sub(fds_before)
        )));
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss_held = rss_bytes(pid)?;
    let slab_held = slab_bytes()?;
    let mut m = vec![
        ("conns", n as f64),
        ("client_procs", clients.len() as f64),
        ("source_addrs", sizing.addrs() as f64),
        ("establish_s", established),
        ("establish_per_s", n as f64 / established),
        (
            "rss_per_held_conn",
            (rss_held as f64 - rss_before as f64) / n as f64,
        ),
        // Both ends of every connection are on this machine: per socket is per 2 N.
        (
            "slab_per_socket",
            (slab_held as f64 - slab_before as f64) / (2 * n) as f64,
        ),
    ];

    // PING round trips on random connections, one client process at a time.
    let mut idle = new_hist()?;
    let share = pings.div_ceil(clients.len()).max(1);
    for c in &mut clients {
        c.send(&format!("ping {share}"))?;
        record(&mut idle, &c.expect("rtt")?);
    }
    push_latency(&mut m, &idle, ["ping_p50_us", "ping_p99_us", "ping_max_us"]);

    // 1 % active: pipelined ECHO on each client's first 1 %, PINGs on the idle rest meanwhile.
    let mut busy = new_hist()?;
    let mut replies = 0u64;
    let ms = active_for.as_millis();
    for c in &mut clients {
        c.send(&format!("busy {ms} {share}"))?;
    }
    for c in &clients {
        let rest = c.expect("busy")?;
        let (count, rtts) = rest.split_once(' ').unwrap_or((&rest, ""));
        replies += count.parse::<u64>().unwrap_or(0);
        record(&mut busy, rtts);
    }
    m.push((
        "active_req_per_s",
        replies as f64 / active_for.as_secs_f64(),
    ));
    push_latency(
        &mut m,
        &busy,
        ["busy_ping_p50_us", "busy_ping_p99_us", "busy_ping_max_us"],
    );

    // Every peer closes every connection at once.
    let storm = Instant::now();
    for c in &mut clients {
        c.send("close")?;
    }
    let released = wait_until(Duration::from_secs(60), || {
        Ok(procfs::open_fds(pid)? <= fds_before)
    })?;
    let release_ms = storm.elapsed().as_secs_f64() * 1e3;
    let mut client_close_ms = 0f64;
    for c in &clients {
        client_close_ms = client_close_ms.max(c.expect("closed")?.parse().unwrap_or(0.0));
    }
    if !released {
        let left = procfs::open_fds(pid)?.saturating_sub(fds_before);
        return Err(io::Error::other(format!(
            "{left} connections still open in the server 60 s after every peer closed"
        )));
    }
    let other = cpu_snapshot(pid, &clients)?.other_since(&cpu_before);
    let close_wait = procfs::close_wait_sockets(pid)?;
    m.push(("other_cpu_cores", other));
    m.push(("release_ms", release_ms));
    m.push(("fd_read_ms", fd_read_ms));
    m.push(("peer_close_ms", client_close_ms));
    m.push(("close_wait", close_wait as f64));
    drop(clients);
    Ok(m)
}

/// Flags of the hidden `loadtest scale-client` (started by `bench`/`scale`).
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// The server.
    #[arg(long)]
    pub server: SocketAddr,
    /// Global index of this client's first connection (picks its source addresses).
    #[arg(long)]
    pub from: usize,
    /// Connections this client holds.
    #[arg(long)]
    pub count: usize,
    /// Connections per loopback source address.
    #[arg(long)]
    pub per_addr: usize,
}

/// A client process: holds its connections and answers the parent's commands, one per line
/// on stdin (`connect`, `ping M`, `busy MS M`, `close`); EOF ends it.
pub fn client(args: ClientArgs) -> ExitCode {
    match client_loop(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadtest scale-client: {e}");
            println!("error {e}");
            ExitCode::FAILURE
        }
    }
}

fn client_loop(args: &ClientArgs) -> io::Result<()> {
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("loadtest scale-client: cannot raise RLIMIT_NOFILE: {e}");
    }
    let mut out = io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let mut idle: Vec<TcpStream> = Vec::new();
    let mut active: Option<Driver> = None;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ args.from as u64);
    for line in io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["connect"] => {
                idle = connect_all(args)?;
                writeln!(out, "connected")?;
            }
            ["ping", m] => {
                let rtts = ping_random(&mut idle, parse(m)?, &mut rng, None)?;
                writeln!(out, "rtt {}", join(&rtts))?;
            }
            ["busy", ms, m] => {
                let span = Duration::from_millis(parse(ms)? as u64);
                let n_active = (idle.len() / 100).max(1).min(idle.len());
                let streams: Vec<TcpStream> = idle.drain(..n_active).collect();
                let (done_tx, done_rx) = mpsc::channel();
                let worker = std::thread::spawn(move || -> io::Result<(Driver, u64)> {
                    let mut driver = Driver::start(streams, ACTIVE_DEPTH, ACTIVE_PAYLOAD)?;
                    let mut ignored = new_hist()?;
                    let count = driver.pump(Instant::now() + span, &mut ignored);
                    let _ = done_tx.send(());
                    let count = count?;
                    // Replies left unread would turn the close below into an RST.
                    driver.drain(Instant::now() + Duration::from_secs(10))?;
                    Ok((driver, count))
                });
                let rtts = ping_random(&mut idle, parse(m)?, &mut rng, Some(&done_rx))?;
                let (driver, count) = worker
                    .join()
                    .map_err(|_| io::Error::other("the active-load thread panicked"))??;
                active = Some(driver);
                writeln!(out, "busy {count} {}", join(&rtts))?;
            }
            ["close"] => {
                let t = Instant::now();
                drop(std::mem::take(&mut idle));
                drop(active.take());
                writeln!(out, "closed {:.3}", t.elapsed().as_secs_f64() * 1e3)?;
            }
            _ => writeln!(out, "error unknown command {line:?}")?,
        }
        out.flush()?;
    }
    Ok(())
}

fn parse(v: &str) -> io::Result<usize> {
    v.parse()
        .map_err(|_| io::Error::other(format!("bad number {v:?}")))
}

fn join(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
}

/// Connect this client's share, each from its source address (127.0.0.2 + global index /
/// per_addr), with blocking connects.
fn connect_all(args: &ClientArgs) -> io::Result<Vec<TcpStream>> {
    use socket2::{Domain, Socket, Type};
    let mut held = Vec::with_capacity(args.count);
    for i in args.from..args.from + args.count {
        let k = u32::try_from(2 + i / args.per_addr.max(1))
            .map_err(|_| io::Error::other("too many source addresses"))?;
        let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + k);
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::new(IpAddr::V4(src), 0).into())?;
        socket
            .connect(&args.server.into())
            .map_err(|e| io::Error::new(e.kind(), format!("connect #{i} from {src}: {e}")))?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        held.push(stream);
    }
    Ok(held)
}

/// `IP_BIND_ADDRESS_NO_PORT`: the bind fixes only the source address and `connect` picks the
/// port for the whole 4-tuple. Without it `bind` must find a port free on that address for
/// every destination, and TIME_WAIT sockets of an earlier run make it fail with EADDRINUSE.
fn bind_address_no_port(socket: &socket2::Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&on`, a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Up to `m` PINGs, each on a random held connection, one at a time; round trips in µs.
/// With `stop`, ends early once it fires (the active phase is over).
fn ping_random(
    held: &mut [TcpStream],
    m: usize,
    rng: &mut Rng,
    stop: Option<&mpsc::Receiver<()>>,
) -> io::Result<Vec<u64>> {
    let mut rtts = Vec::with_capacity(m);
    if held.is_empty() {
        return Ok(rtts);
    }
    let mut reply = [0u8; 5];
    for _ in 0..m {
        if stop.is_some_and(|s| s.try_recv().is_ok()) {
            break;
        }
        let s = &mut held[rng.below(held.len())];
        let t = Instant::now();
        s.write_all(&[0, 0, 0, 1, PING])?;
        s.read_exact(&mut reply)?;
        rtts.push(t.elapsed().as_micros() as u64);
        if reply != [0, 0, 0, 1, PING_REPLY] {
            return Err(io::Error::other(format!(
                "unexpected reply to PING: {reply:?}"
            )));
        }
    }
    Ok(rtts)
}

/// xorshift64: picks connections; no crate needed for that.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Report the sizing in one line.
pub fn describe(s: &Sizing) -> String {
    format!(
        "{} connections (limited by {}), over {} client process(es) and {} source address(es) \
         (at most {} per address)",
        s.conns,
        s.limited_by,
        s.clients,
        s.addrs(),
        s.per_addr
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_default_the_server_fd_limit_sets_the_count_and_the_report_says_so() {
        let s = Sizing::from_limits(20_000, 2_466_177, 28_232, None);
        assert_eq!(s.conns, 19_960, "20,000 less closewait's reserve of 40");
        assert!(s.limited_by.contains("RLIMIT_NOFILE"), "{}", s.limited_by);
        assert_eq!((s.clients, s.addrs()), (2, 1));
    }

    #[test]
    fn more_than_the_limits_allow_is_cut_to_them_and_names_the_limit() {
        let s = Sizing::from_limits(20_000, 2_466_177, 28_232, Some(1_000_000));
        assert_eq!(s.conns, 19_960);
        assert!(s.limited_by.contains("RLIMIT_NOFILE"), "{}", s.limited_by);
        let s = Sizing::from_limits(1_048_576, 1_000_000, 28_232, Some(1_000_000));
        assert_eq!(
            s.conns, 495_000,
            "two files per connection under fs.file-max less 10,000"
        );
        assert!(s.limited_by.contains("fs.file-max"), "{}", s.limited_by);
    }

    #[test]
    fn a_million_is_spread_over_source_addresses_by_the_port_range() {
        let s = Sizing::from_limits(1_048_576, 2_466_177, 28_232, Some(1_000_000));
        assert_eq!(s.conns, 1_000_000);
        assert_eq!(s.limited_by, "--conns");
        assert_eq!(
            s.clients, 2,
            "one process may hold 1,048,512 fds; two are the minimum"
        );
        assert_eq!(s.addrs(), 1_000_000usize.div_ceil(26_232));
    }
}
