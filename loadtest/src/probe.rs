//! `loadtest probe`: test any server on this machine for the CLOSE_WAIT leak.
//!
//! Protocol-agnostic: it opens connections to a loopback address, optionally sends each one
//! payload (one request of the server's protocol, so that its handler is running), then ends
//! them the four ways real peers do — FIN, half-close, RST, and closing while the server is
//! still replying — and watches the server's side of exactly those connections, by 4-tuple in
//! the kernel's TCP tables and by inode in the server's `/proc/PID/fd`. A server that closes
//! its end releases the socket within milliseconds; one that leaks keeps the fd open, in
//! CLOSE_WAIT after a FIN, or outside any TCP table after a reset (the state `lsof` shows as
//! `protocol: TCP`, which `ss` cannot see).
//!
//! It must be safe to point at a live server: loopback only, nothing sent but the payload it
//! was given, every connection it opened closed before it exits, every wait bounded.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use closewait::testing::procfs;
use mio::{Events, Interest, Poll, Token};

/// Longest a connect or a payload write may take.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server gets to accept every connection before the probe says it does not.
const ACCEPT_WAIT: Duration = Duration::from_secs(5);
/// How long the payload's replies may take to start arriving.
const REPLY_WAIT: Duration = Duration::from_secs(5);
/// A reply is taken as complete once nothing more arrived for this long (the probe does not
/// know the protocol, so it cannot count bytes).
const REPLY_QUIET: Duration = Duration::from_millis(100);
/// How often the release of the server's sockets is checked.
const CHECK_EVERY: Duration = Duration::from_millis(20);
/// How often the progress line is printed while waiting.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Bytes the mid-reply way reads before it closes: proof the reply had begun, no more.
const MID_REPLY_READ: usize = 1;
/// Exit status when the probe could not test (bad arguments, server not there).
const EXIT_CANNOT_TEST: u8 = 2;

/// Flags of `loadtest probe`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The server's address; loopback only (127.0.0.0/8 or ::1).
    #[arg(value_name = "ADDR")]
    pub addr: SocketAddr,
    /// The server's process (default: whichever process holds the listening socket).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Connections per way of ending.
    #[arg(long, default_value_t = 100, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=5000))]
    pub connections: u64,
    /// Bytes to send on every connection first, in hex (e.g. `0000000102`, a closewait PING).
    #[arg(long, value_name = "HEX", conflicts_with = "send_file")]
    pub send: Option<String>,
    /// Like --send, but the bytes of a file.
    #[arg(long, value_name = "FILE")]
    pub send_file: Option<PathBuf>,
    /// Seconds the server gets to release its sockets after the peers ended.
    #[arg(long, default_value_t = 5.0, value_name = "SECS", value_parser = parse_wait)]
    pub wait: f64,
}

fn parse_wait(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(secs) if (0.1..=600.0).contains(&secs) => Ok(secs),
        _ => Err("expected seconds between 0.1 and 600".into()),
    }
}

/// How a peer ends its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Way {
    /// Reads the reply, then `close()`: a FIN.
    Fin,
    /// `shutdown(SHUT_WR)` (a FIN), then keeps reading until the server closes.
    HalfClose,
    /// Reads the reply, then `close()` with `SO_LINGER` 0: an RST.
    Reset,
    /// Reads the first byte of the reply, then `close()`: the unread rest makes the kernel
    /// send RST while the server may still be writing.
    MidReply,
}

impl Way {
    const ALL: [Way; 4] = [Way::Fin, Way::HalfClose, Way::Reset, Way::MidReply];

    fn name(self) -> &'static str {
        match self {
            Way::Fin => "fin",
            Way::HalfClose => "half-close",
            Way::Reset => "reset",
            Way::MidReply => "mid-reply",
        }
    }

    /// What the server's kernel receives.
    fn signal(self) -> &'static str {
        match self {
            Way::Fin | Way::HalfClose => "FIN",
            Way::Reset | Way::MidReply => "RST",
        }
    }
}

/// One connection the probe opened.
struct Peer {
    way: Way,
    /// `None` once the probe closed it.
    stream: Option<mio::net::TcpStream>,
    /// The probe's end; the server's socket is `(addr, local)`.
    local: SocketAddr,
    /// The server's socket, once accepted (a socket still in the listen queue has none).
    inode: Option<u64>,
    last_data: Option<Instant>,
    /// When the probe ended it the way of `way`.
    ended: Option<Instant>,
    /// When the probe saw the server's socket gone, or its fd closed.
    released: Option<Instant>,
}

impl Peer {
    /// Close without `SO_LINGER` 0 (a FIN, or an RST if replies are left unread).
    fn close(&mut self) {
        self.stream = None;
    }

    /// End it the way of its `way`, once.
    fn end(&mut self, now: Instant) {
        if self.ended.is_some() {
            return;
        }
        self.ended = Some(now);
        match self.way {
            Way::Fin | Way::MidReply => self.close(),
            Way::HalfClose => {
                if let Some(s) = &self.stream {
                    let _ = s.shutdown(Shutdown::Write);
                }
            }
            Way::Reset => {
                if let Some(s) = &self.stream {
                    // Linger 0: close() discards the socket at once and sends RST.
                    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
                }
                self.close();
            }
        }
    }

    /// Read what is there (edge-triggered: until `WouldBlock`). The mid-reply way reads one
    /// byte and stops. Returns whether the server closed its end (EOF or error).
    fn read(&mut self, buf: &mut [u8]) -> bool {
        let Some(stream) = self.stream.as_mut() else {
            return false;
        };
        let limit = if self.way == Way::MidReply {
            MID_REPLY_READ
        } else {
            buf.len()
        };
        loop {
            match stream.read(&mut buf[..limit]) {
                Ok(0) => return true,
                Ok(_) => {
                    self.last_data = Some(Instant::now());
                    if self.way == Way::MidReply {
                        return false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    }
}

/// One row of `/proc/net/tcp{,6}` with its addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Row {
    local: SocketAddr,
    remote: SocketAddr,
    state: u8,
    inode: u64,
}

/// An address as `/proc/net/tcp{,6}` prints it: the IP as native-endian 32-bit words in hex,
/// then the port in hex. IPv4-mapped IPv6 addresses (a dual-stack listener's IPv4 peers)
/// come back as IPv4, so they compare equal to what `connect` reports.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(8 * i..8 * i + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(canonical(SocketAddr::new(ip, port)))
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// Rows of a TCP table whose local port is `port`, one per 4-tuple: while sockets come and go
/// the kernel can print a row twice in one read (see `procfs::tcp_rows`), and a socket must
/// count once. The port is matched on the text first: a busy host's table has tens of
/// thousands of rows (45,000 on the project's VM, mostly TIME_WAIT left by benchmarks), and
/// parsing them all at every check took seconds.
fn parse_rows(text: &str, port: u16) -> Vec<Row> {
    let port_suffix = format!(":{port:04X}");
    let mut seen = HashSet::new();
    text.lines()
        .skip(1)
        .filter(|line| {
            line.split_whitespace()
                .nth(1)
                .is_some_and(|local| local.ends_with(&port_suffix))
        })
        .filter_map(|line| {
            // Columns: sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
            let cols: Vec<&str> = line.split_whitespace().collect();
            Some(Row {
                local: parse_addr(cols.get(1)?)?,
                remote: parse_addr(cols.get(2)?)?,
                state: u8::from_str_radix(cols.get(3)?, 16).ok()?,
                inode: cols.get(9)?.parse().ok()?,
            })
        })
        .filter(|row| seen.insert((row.local, row.remote)))
        .collect()
}

/// The TCP sockets of this network namespace (the server's, since it is on loopback) whose
/// local port is `port`.
fn read_tables(port: u16) -> io::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        match fs::read_to_string(table) {
            Ok(text) => rows.extend(parse_rows(&text, port)),
            // tcp6 is absent when IPv6 is disabled.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("reading {table}: {e}"))),
        }
    }
    Ok(rows)
}

/// The server's side of each connection, by 4-tuple.
fn server_side(rows: &[Row], addr: SocketAddr) -> HashMap<SocketAddr, Row> {
    rows.iter()
        .filter(|r| r.local == addr && r.state != procfs::TCP_LISTEN)
        .map(|r| (r.remote, *r))
        .collect()
}

/// The processes holding the socket that listens on `addr`: what `ss -ltnp` shows, found as
/// it finds it (the listener's inode, then every `/proc/PID/fd`).
fn find_pids(addr: SocketAddr) -> io::Result<Vec<u32>> {
    let listeners: HashSet<u64> = read_tables(addr.port())?
        .into_iter()
        .filter(|r| {
            r.state == procfs::TCP_LISTEN
                && r.local.port() == addr.port()
                && (r.local.ip() == addr.ip() || r.local.ip().is_unspecified())
        })
        .map(|r| r.inode)
        .collect();
    let mut pids = Vec::new();
    if listeners.is_empty() {
        return Ok(pids);
    }
    for entry in fs::read_dir("/proc")? {
        let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // Another user's process, or one that just exited: not ours to see.
        if let Ok(inodes) = procfs::socket_inodes(pid) {
            if !inodes.is_disjoint(&listeners) {
                pids.push(pid);
            }
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// Socket inodes held by any of `pids` (empty when a process is gone).
fn held_inodes(pids: &[u32]) -> HashSet<u64> {
    pids.iter()
        .filter_map(|&pid| procfs::socket_inodes(pid).ok())
        .flatten()
        .collect()
}

/// Decode `--send`: hex digits, whitespace ignored.
fn parse_hex(hex: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.len() % 2 != 0 {
        return Err("--send: an odd number of hex digits".into());
    }
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("--send: {:?} is not hex", String::from_utf8_lossy(pair)))
        })
        .collect()
}

/// What the probe saw of one way of ending.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Outcome {
    opened: usize,
    /// Accepted by the server (the others waited in its listen queue throughout).
    accepted: usize,
    released: usize,
    /// Longest time from the peer's end to the server's release, among the released.
    slowest: Option<Duration>,
    /// Still held by the server and in CLOSE_WAIT.
    close_wait: usize,
    /// Still held by the server in another state (after a reset: in no TCP table at all).
    held_otherwise: usize,
}

impl Outcome {
    fn leaked(&self) -> usize {
        self.close_wait + self.held_otherwise
    }
}

/// Everything `probe` prints, computed before printing (so it is testable).
struct Report {
    ways: Vec<(Way, Outcome)>,
    skipped: Vec<(Way, &'static str)>,
    wait: Duration,
    /// Whether the server's fds were seen (a pid): without, a reset leak is invisible.
    by_fd: bool,
}

/// The one-line verdict and whether it is a pass.
fn verdict(report: &Report) -> (String, bool) {
    let not_accepted: usize = report.ways.iter().map(|(_, o)| o.opened - o.accepted).sum();
    let leaking: Vec<&(Way, Outcome)> =
        report.ways.iter().filter(|(_, o)| o.leaked() > 0).collect();
    let secs = report.wait.as_secs_f64();
    if !leaking.is_empty() {
        let mut signals: Vec<&str> = leaking.iter().map(|(w, _)| w.signal()).collect();
        signals.dedup();
        let parts: Vec<String> = leaking
            .iter()
            .map(|(way, o)| {
                let mut part = format!("{} {} of {}", way.name(), o.leaked(), o.opened);
                match (o.close_wait, o.held_otherwise) {
                    (_, 0) => part.push_str(" still in CLOSE_WAIT"),
                    (0, _) => part.push_str(" still open after the reset, in no TCP table"),
                    (cw, other) => {
                        let _ = write!(part, " still open ({cw} in CLOSE_WAIT, {other} reset)");
                    }
                }
                part
            })
            .collect();
        return (
            format!(
                "LEAK: leaks one fd per peer {}: {} after {secs} s",
                signals.join(" and "),
                parts.join("; ")
            ),
            false,
        );
    }
    if not_accepted > 0 {
        return (
            format!(
                "CANNOT TELL: {not_accepted} connections were never accepted (the server is \
                 not accepting: at its fd limit or connection cap?)"
            ),
            false,
        );
    }
    let total: usize = report.ways.iter().map(|(_, o)| o.released).sum();
    let slowest = report
        .ways
        .iter()
        .filter_map(|(_, o)| o.slowest)
        .max()
        .unwrap_or_default();
    let mut line = format!(
        "no leak: the server released all {total} sockets, the slowest {:.3} s after its peer ended",
        slowest.as_secs_f64()
    );
    if !report.by_fd {
        line.push_str(" (TCP table only: without the server's pid a reset leak is invisible)");
    }
    (line, true)
}

/// The per-way table.
fn table(report: &Report) -> String {
    let mut out = format!(
        "{:<11} {:>6} {:>8} {:>8} {:>9} {:>10} {:>14}\n",
        "way", "opened", "accepted", "released", "slowest", "close_wait", "held_otherwise"
    );
    for (way, o) in &report.ways {
        let slowest = o
            .slowest
            .map_or("-".to_string(), |d| format!("{:.3}s", d.as_secs_f64()));
        let _ = writeln!(
            out,
            "{:<11} {:>6} {:>8} {:>8} {:>9} {:>10} {:>14}",
            way.name(),
            o.opened,
            o.accepted,
            o.released,
            slowest,
            o.close_wait,
            o.held_otherwise
        );
    }
    for (way, why) in &report.skipped {
        let _ = writeln!(out, "{:<11} skipped: {why}", way.name());
    }
    out
}

/// Run the probe: exit 0 when the server released every socket, 1 when it leaks (or could
/// not be tested because it accepts nothing), 2 when the probe itself could not run.
pub fn run(args: Args) -> ExitCode {
    match probe(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("loadtest probe: {e}");
            ExitCode::from(EXIT_CANNOT_TEST)
        }
    }
}

fn probe(args: &Args) -> io::Result<bool> {
    let addr = canonical(args.addr);
    if !addr.ip().is_loopback() {
        return Err(io::Error::other(format!(
            "{addr} is not a loopback address: the probe only tests servers on this machine"
        )));
    }
    let payload =
        match (&args.send, &args.send_file) {
            (Some(hex), _) => Some(parse_hex(hex).map_err(io::Error::other)?),
            (_, Some(path)) => Some(fs::read(path).map_err(|e| {
                io::Error::new(e.kind(), format!("reading {}: {e}", path.display()))
            })?),
            _ => None,
        }
        .filter(|p| !p.is_empty());
    let pids = match args.pid {
        Some(pid) => {
            procfs::socket_inodes(pid).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("--pid {pid}: reading /proc/{pid}/fd: {e}"),
                )
            })?;
            vec![pid]
        }
        None => find_pids(addr)?,
    };
    describe_server(addr, &pids, "before");
    let mut skipped = Vec::new();
    let ways: Vec<Way> = Way::ALL
        .into_iter()
        .filter(|&way| {
            let testable = way != Way::MidReply || payload.is_some();
            if !testable {
                skipped.push((
                    way,
                    "needs --send or --send-file: a request whose reply is larger than the socket buffers",
                ));
            }
            testable
        })
        .collect();
    // Our own connections need fds too.
    let _ = rlimit::increase_nofile_limit(u64::MAX);

    let mut peers = connect_all(addr, &ways, args.connections as usize)?;
    eprintln!(
        "probe: {} connections open ({} per way); waiting for the server to accept them",
        peers.len(),
        args.connections
    );
    await_accepted(addr, &mut peers)?;
    if let Some(pid) = args.pid {
        // A wrong --pid would hold none of them, and every socket would look released.
        let held = held_inodes(&pids);
        let accepted = peers.iter().filter_map(|p| p.inode);
        if accepted.clone().next().is_some() && !accepted.into_iter().any(|i| held.contains(&i)) {
            return Err(io::Error::other(format!(
                "process {pid} holds none of the sockets that accepted the probe's connections: \
                 is it the server listening on {addr}?"
            )));
        }
    }
    send_payload(&mut peers, payload.as_deref())?;

    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    for (i, peer) in peers.iter_mut().enumerate() {
        if let Some(s) = peer.stream.as_mut() {
            poll.registry().register(s, Token(i), Interest::READABLE)?;
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    let wait = Duration::from_secs_f64(args.wait);
    end_and_watch(
        addr,
        &pids,
        &mut poll,
        &mut events,
        &mut peers,
        payload.is_some(),
        wait,
        &mut buf,
    )?;

    let rows = server_side(&read_tables(addr.port())?, addr);
    let held = held_inodes(&pids);
    let report = Report {
        ways: ways
            .iter()
            .map(|&way| (way, outcome(way, &peers, &rows, &held, !pids.is_empty())))
            .collect(),
        skipped,
        wait,
        by_fd: !pids.is_empty(),
    };
    // Everything we opened is closed before we report (the half-closed ones are still open
    // when the server never closed its end).
    drop(peers);
    print!("{}", table(&report));
    describe_server(addr, &pids, "after");
    let (line, pass) = verdict(&report);
    println!("verdict: {line}");
    Ok(pass)
}

/// The server's fds against its limit, on stdout.
fn describe_server(addr: SocketAddr, pids: &[u32], when: &str) {
    if pids.is_empty() {
        println!(
            "server {addr}: no process found holding its listener (another user's? pass --pid); \
             counting from the TCP tables only"
        );
        return;
    }
    for &pid in pids {
        let fds = procfs::open_fds(pid);
        let limit = procfs::nofile_limit(pid);
        match (fds, limit) {
            (Ok(fds), Ok((Some(soft), hard))) => println!(
                "server {addr} pid {pid} {when}: {fds} fds open, soft limit {soft} (hard {}), headroom {}",
                hard.map_or("unlimited".into(), |h| h.to_string()),
                soft.saturating_sub(fds as u64)
            ),
            (Ok(fds), Ok((None, _))) => {
                println!("server {addr} pid {pid} {when}: {fds} fds open, no fd limit")
            }
            (Err(e), _) | (_, Err(e)) => {
                println!("server {addr} pid {pid} {when}: cannot read /proc/{pid}: {e}")
            }
        }
    }
}

fn connect_all(addr: SocketAddr, ways: &[Way], n: usize) -> io::Result<Vec<Peer>> {
    let mut peers = Vec::with_capacity(ways.len() * n);
    for &way in ways {
        for _ in 0..n {
            let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
                .map_err(|e| io::Error::new(e.kind(), format!("connecting to {addr}: {e}")))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            // mio requires it; the payload is written in blocking mode (`send_payload`).
            stream.set_nonblocking(true)?;
            let local = canonical(stream.local_addr()?);
            peers.push(Peer {
                way,
                stream: Some(mio::net::TcpStream::from_std(stream)),
                local,
                inode: None,
                last_data: None,
                ended: None,
                released: None,
            });
        }
    }
    Ok(peers)
}

/// Learn the server's inode of each connection: it has one once the server accepted it.
fn await_accepted(addr: SocketAddr, peers: &mut [Peer]) -> io::Result<()> {
    let deadline = Instant::now() + ACCEPT_WAIT;
    loop {
        let rows = server_side(&read_tables(addr.port())?, addr);
        for peer in peers.iter_mut().filter(|p| p.inode.is_none()) {
            peer.inode = rows
                .get(&peer.local)
                .map(|r| r.inode)
                .filter(|&inode| inode != 0);
        }
        let waiting = peers.iter().filter(|p| p.inode.is_none()).count();
        if waiting == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            eprintln!(
                "probe: the server did not accept {waiting} connections within {ACCEPT_WAIT:?}; \
                 they are tested from the TCP table only"
            );
            return Ok(());
        }
        std::thread::sleep(CHECK_EVERY);
    }
}

/// Send the payload on every connection (blocking, bounded by [`IO_TIMEOUT`]).
fn send_payload(peers: &mut [Peer], payload: Option<&[u8]>) -> io::Result<()> {
    let Some(payload) = payload else {
        return Ok(());
    };
    for peer in peers.iter_mut() {
        let Some(stream) = peer.stream.as_ref() else {
            continue;
        };
        // Blocking for the write only: a socket2 view, so the mio stream stays as it is.
        let sock = socket2::SockRef::from(stream);
        sock.set_nonblocking(false)?;
        let mut written = 0;
        while written < payload.len() {
            match sock.send(&payload[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("sending the payload from {}: {e}", peer.local),
                    ))
                }
            }
        }
        sock.set_nonblocking(true)?;
    }
    Ok(())
}

/// End every connection its way, then wait up to `wait` after the last end for the server
/// to release the socket of each, printing a progress line each second. With a payload, FIN
/// and reset peers first read the reply to the end (as a real client would), and mid-reply
/// peers wait for its first byte. Releases are checked from the first end on, so each is
/// timed from its own peer's end.
#[allow(clippy::too_many_arguments)]
fn end_and_watch(
    addr: SocketAddr,
    pids: &[u32],
    poll: &mut Poll,
    events: &mut Events,
    peers: &mut [Peer],
    has_payload: bool,
    wait: Duration,
    buf: &mut [u8],
) -> io::Result<()> {
    let start = Instant::now();
    for peer in peers.iter_mut() {
        if !has_payload || peer.way == Way::HalfClose {
            peer.end(start);
        }
    }
    // Replies that arrived before the sockets were registered: edge-triggered readiness
    // would not report them again.
    for peer in peers.iter_mut() {
        on_readable(peer, buf);
    }
    let reply_deadline = start + REPLY_WAIT;
    let mut next_progress = start + PROGRESS_EVERY;
    loop {
        let now = Instant::now();
        let next_quiet = end_due(peers, now, reply_deadline);
        check_releases(addr, pids, peers)?;
        let released = peers.iter().filter(|p| p.released.is_some()).count();
        let last_end = peers
            .iter()
            .map(|p| p.ended)
            .try_fold(start, |last, ended| ended.map(|e| last.max(e)));
        if let Some(last_end) = last_end {
            if released == peers.len() || now >= last_end + wait {
                eprintln!(
                    "probe: {released} of {} server sockets released, {:.1} s after the last peer ended",
                    peers.len(),
                    now.duration_since(last_end).as_secs_f64()
                );
                return Ok(());
            }
        }
        if now >= next_progress {
            eprintln!(
                "probe: {released} of {} server sockets released after {:.1} s; waiting up to {} s after the last peer ends",
                peers.len(),
                now.duration_since(start).as_secs_f64(),
                wait.as_secs_f64()
            );
            next_progress += PROGRESS_EVERY;
        }
        let timeout = next_quiet.map_or(CHECK_EVERY, |q| {
            q.saturating_duration_since(now).min(CHECK_EVERY)
        });
        // Also keeps reading the half-closed connections: replies, then the server's FIN.
        poll_once(poll, events, peers, timeout, buf)?;
    }
}

/// End the peers whose moment has come; return when the next reply goes quiet.
fn end_due(peers: &mut [Peer], now: Instant, reply_deadline: Instant) -> Option<Instant> {
    let mut next_quiet: Option<Instant> = None;
    for peer in peers.iter_mut().filter(|p| p.ended.is_none()) {
        match (peer.way, peer.last_data) {
            (Way::MidReply, Some(_)) => peer.end(now),
            (Way::Fin | Way::Reset, Some(last)) if now >= last + REPLY_QUIET => peer.end(now),
            (_, Some(last)) => {
                let quiet = last + REPLY_QUIET;
                next_quiet = Some(next_quiet.map_or(quiet, |q| q.min(quiet)));
            }
            _ => {}
        }
    }
    let waiting = peers.iter().filter(|p| p.ended.is_none()).count();
    if waiting > 0 && now >= reply_deadline {
        eprintln!(
            "probe: {waiting} connections got no reply to the payload within {REPLY_WAIT:?}; ending them anyway"
        );
        for peer in peers.iter_mut() {
            peer.end(now);
        }
    }
    next_quiet
}

/// Mark the ended peers whose server socket is gone: its fd closed (with a pid and a known
/// inode), else no longer in a live state of the TCP table.
fn check_releases(addr: SocketAddr, pids: &[u32], peers: &mut [Peer]) -> io::Result<()> {
    let pending = |p: &Peer| p.ended.is_some() && p.released.is_none();
    // A process's fds are cheap to read; the TCP tables (every socket of the machine) are
    // read only for connections whose inode is unknown, or when there is no pid.
    let held = held_inodes(pids);
    let need_table = peers
        .iter()
        .any(|p| pending(p) && (pids.is_empty() || p.inode.is_none()));
    let rows = if need_table {
        Some(server_side(&read_tables(addr.port())?, addr))
    } else {
        None
    };
    let now = Instant::now();
    for peer in peers.iter_mut().filter(|p| pending(p)) {
        let gone = match (peer.inode, &rows) {
            (Some(inode), _) if !pids.is_empty() => !held.contains(&inode),
            (_, Some(rows)) => !rows.get(&peer.local).is_some_and(|r| {
                r.state == procfs::TCP_CLOSE_WAIT || r.state == procfs::TCP_ESTABLISHED
            }),
            _ => false,
        };
        if gone {
            peer.released = Some(now);
        }
    }
    Ok(())
}

/// Wait for readiness up to `timeout`, and read what came.
fn poll_once(
    poll: &mut Poll,
    events: &mut Events,
    peers: &mut [Peer],
    timeout: Duration,
    buf: &mut [u8],
) -> io::Result<()> {
    match poll.poll(events, Some(timeout)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
        Err(e) => return Err(e),
    }
    for event in events.iter() {
        if let Some(peer) = peers.get_mut(event.token().0) {
            on_readable(peer, buf);
        }
    }
    Ok(())
}

fn on_readable(peer: &mut Peer, buf: &mut [u8]) {
    if peer.read(buf) {
        // The server closed its end. A half-closed peer is done; the others were ended by
        // the server first, which counts as ended (nothing of ours is left to close).
        let now = Instant::now();
        if peer.ended.is_none() {
            peer.ended = Some(now);
        }
        peer.close();
    }
}

/// Count one way's connections from the final state of the tables and the server's fds.
fn outcome(
    way: Way,
    peers: &[Peer],
    rows: &HashMap<SocketAddr, Row>,
    held: &HashSet<u64>,
    by_fd: bool,
) -> Outcome {
    let mut o = Outcome::default();
    for peer in peers.iter().filter(|p| p.way == way) {
        o.opened += 1;
        o.accepted += usize::from(peer.inode.is_some());
        if let (Some(released), Some(ended)) = (peer.released, peer.ended) {
            o.released += 1;
            let took = released.saturating_duration_since(ended);
            o.slowest = Some(o.slowest.map_or(took, |s| s.max(took)));
            continue;
        }
        let row = rows.get(&peer.local);
        if row.is_some_and(|r| r.state == procfs::TCP_CLOSE_WAIT) {
            o.close_wait += 1;
        } else if by_fd && peer.inode.is_some_and(|i| held.contains(&i)) {
            o.held_otherwise += 1;
        } else if row.is_some() {
            // Never accepted, or no pid: still in a table, in a live state.
            o.held_otherwise += 1;
        } else {
            // Released between the last check and now.
            o.released += 1;
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded on Linux 6.x: a closewait listener on 127.0.0.1:7878, a connection from port
    // 54258 in CLOSE_WAIT and the same 4-tuple printed twice; a dual-stack listener and an
    // IPv4 peer of it in tcp6 (mapped address).
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1EC6 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41817 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1EC6 0100007F:D3F2 08 00000000:00000000 00:00000000 00000000     0        0 41820 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:D3F2 0100007F:1EC6 05 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:1EC6 0100007F:D3F2 08 00000000:00000000 00:00000000 00000000     0        0 41820 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 52001 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 52007 1 0000000000000000 20 4 30 10 -1
   2: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:A1B4 08 00000000:00000000 00:00000000 00000000     0        0 52009 1 0000000000000000 20 4 30 10 -1
";

    fn v4(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn finds_the_servers_side_of_a_connection_by_its_4_tuple_once() {
        let rows = parse_rows(TCP, 7878);
        // The client's row (local port 54258) is not ours; the repeated row counts once.
        assert_eq!(rows.len(), 2, "{rows:?}");
        let ours = server_side(&rows, v4(7878));
        assert_eq!(ours.len(), 1);
        let row = ours[&v4(0xD3F2)];
        assert_eq!((row.state, row.inode), (procfs::TCP_CLOSE_WAIT, 41820));
    }

    #[test]
    fn reads_ipv6_and_mapped_ipv4_addresses() {
        let rows = parse_rows(TCP6, 8080);
        assert_eq!(rows[0].local, "[::]:8080".parse().unwrap());
        // A dual-stack listener's IPv4 peer: the same address `connect` reports.
        assert_eq!((rows[1].local, rows[1].remote), (v4(8080), v4(0xA1B2)));
        assert_eq!(rows[2].remote, "[::1]:41396".parse().unwrap());
        assert_eq!(parse_addr("0100007F"), None);
        assert_eq!(parse_addr("0100007F:ZZ"), None);
    }

    #[test]
    fn decodes_hex_payloads_and_refuses_what_is_not_hex() {
        assert_eq!(parse_hex("00000001 02"), Ok(vec![0, 0, 0, 1, 2]));
        assert!(parse_hex("0").is_err());
        assert!(parse_hex("zz").is_err());
    }

    fn report(ways: Vec<(Way, Outcome)>) -> Report {
        Report {
            ways,
            skipped: vec![],
            wait: Duration::from_secs(5),
            by_fd: true,
        }
    }

    fn released(n: usize) -> Outcome {
        Outcome {
            opened: n,
            accepted: n,
            released: n,
            slowest: Some(Duration::from_millis(3)),
            ..Outcome::default()
        }
    }

    #[test]
    fn the_verdict_of_a_fin_leak_names_the_fin_and_the_counts() {
        let leak = Outcome {
            released: 0,
            slowest: None,
            close_wait: 100,
            ..released(100)
        };
        let (line, pass) = verdict(&report(vec![
            (Way::Fin, leak.clone()),
            (Way::HalfClose, leak),
            (Way::Reset, released(100)),
        ]));
        assert!(!pass);
        assert_eq!(
            line,
            "LEAK: leaks one fd per peer FIN: fin 100 of 100 still in CLOSE_WAIT; \
             half-close 100 of 100 still in CLOSE_WAIT after 5 s"
        );
    }

    #[test]
    fn the_verdict_of_a_reset_leak_says_the_socket_left_the_tables() {
        let reset = Outcome {
            released: 0,
            slowest: None,
            held_otherwise: 20,
            ..released(20)
        };
        let (line, pass) = verdict(&report(vec![(Way::Fin, released(20)), (Way::Reset, reset)]));
        assert!(!pass);
        assert!(
            line.contains(
                "per peer RST: reset 20 of 20 still open after the reset, in no TCP table"
            ),
            "{line}"
        );
    }

    #[test]
    fn a_server_that_releases_everything_passes_and_one_that_accepts_nothing_does_not() {
        let (line, pass) = verdict(&report(vec![
            (Way::Fin, released(10)),
            (Way::Reset, released(10)),
        ]));
        assert!(pass, "{line}");
        assert!(
            line.starts_with("no leak: the server released all 20 sockets"),
            "{line}"
        );
        let backlog = Outcome {
            accepted: 0,
            ..released(10)
        };
        let (line, pass) = verdict(&report(vec![(Way::Fin, backlog)]));
        assert!(
            !pass && line.contains("10 connections were never accepted"),
            "{line}"
        );
    }
}
