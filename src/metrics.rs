//! The Prometheus endpoint (`--metrics ADDR`): `GET /metrics` on a listener and a thread of
//! its own, in the Prometheus text format (0.0.4, encoded by `prometheus-client`).
//!
//! A scrape reads only what any thread may read without asking the loop: the shared
//! [`Stats`] atomics and histogram, `/proc/self/fd`, `getrlimit`, and the kernel's socket
//! table through netlink `sock_diag`. It takes no lock a worker takes, so it can never stall
//! the event loop, however slow the scraper or the netlink dump.
//!
//! A scraper is a peer like any other and is bounded like one: scrapes are answered one at
//! a time (a few more wait in a small backlog), a request must arrive whole within
//! [`REQUEST_TIMEOUT`] and [`MAX_REQUEST`] bytes, and the response must be taken within
//! [`RESPONSE_TIMEOUT`]; then the connection is closed. The worst a scraper can do is delay
//! other scrapes, which is why the endpoint belongs on loopback or a private interface.
//!
//! Fds: the listener, this thread's epoll and its waker are open before the fd budget is
//! derived (so they are counted); a scrape briefly adds its connection, a netlink socket and
//! a `/proc/self/fd` handle, which `limits::FD_SAFETY_MARGIN` covers.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::stats::{Counter, HistogramSnapshot, Kind, Stats, FIN_TO_CLOSE_BOUNDS_NS};
use crate::throttle::Throttle;
use crate::{limits, procfs, Handle};

/// Time a scraper has to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a scraper has to take the whole response.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest request accepted (request line and headers; a scrape has no body).
pub const MAX_REQUEST: usize = 8 * 1024;
/// Most headers parsed in a request (Prometheus sends about five).
const MAX_HEADERS: usize = 32;
/// Scrapers that may wait while one is answered; the kernel refuses more.
const BACKLOG: i32 = 16;
/// Pause before accepting again after `accept` failed (e.g. EMFILE): the connection stays
/// queued and edge-triggered readiness would not report it again.
const ACCEPT_RETRY: Duration = Duration::from_secs(1);
/// Bound on one netlink receive: the kernel answers a dump at once.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(1);
/// Netlink receive buffer: the kernel sizes dump messages to what the reader offers.
const NETLINK_BUFFER: usize = 64 * 1024;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);

/// A bound metrics listener, not yet serving.
pub(crate) struct Exporter {
    listener: TcpListener,
    local_addr: SocketAddr,
    poll: Poll,
    waker: Arc<Waker>,
}

/// The serving thread; [`Running::stop`] ends it.
pub(crate) struct Running {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: JoinHandle<()>,
}

impl Exporter {
    /// Listen on `addr` (port 0 lets the OS pick).
    pub(crate) fn bind(addr: SocketAddr) -> io::Result<Exporter> {
        let context = |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("cannot listen for metrics on {addr}: {e}"),
            )
        };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(context)?;
        socket.set_reuse_address(true).map_err(context)?;
        socket.bind(&addr.into()).map_err(context)?;
        socket.listen(BACKLOG).map_err(context)?;
        socket.set_nonblocking(true).map_err(context)?;
        let listener = TcpListener::from(socket);
        let local_addr = listener.local_addr()?;
        let poll = Poll::new()?;
        poll.registry().register(
            &mut SourceFd(&listener.as_raw_fd()),
            LISTENER,
            Interest::READABLE,
        )?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        Ok(Exporter {
            listener,
            local_addr,
            poll,
            waker,
        })
    }

    /// The address scrapers connect to.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serve on a thread of its own, reading the counters through `handle`.
    pub(crate) fn spawn(self, handle: Handle) -> io::Result<Running> {
        let stop = Arc::new(AtomicBool::new(false));
        let waker = self.waker.clone();
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name("closewait-metrics".into())
            .spawn(move || self.serve(handle, &flag))?;
        Ok(Running {
            stop,
            waker,
            thread,
        })
    }

    fn serve(mut self, handle: Handle, stop: &AtomicBool) {
        log::info!("metrics on http://{}/metrics", self.local_addr);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Process {
            handle,
            warn: Mutex::new(Throttle::default()),
        }));
        let mut warn = Throttle::default();
        let mut events = Events::with_capacity(4);
        let mut retry = None;
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = self.poll.poll(&mut events, retry) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("metrics: poll failed: {e}; metrics off");
                return;
            }
            retry = None;
            // Accept until the backlog is empty (edge-triggered), checking for stop between
            // scrapers so a queue of slow ones cannot hold shutdown for long.
            while !stop.load(Ordering::Relaxed) {
                match self.listener.accept() {
                    Ok((stream, peer)) => {
                        if let Err(reason) = answer(stream, &registry) {
                            if warn.allow() {
                                log::warn!(
                                    "metrics: {peer}: {reason}; closed{}",
                                    warn.suppressed_note()
                                );
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        if warn.allow() {
                            log::warn!(
                                "metrics: accept failed: {e}; retrying in {ACCEPT_RETRY:?}{}",
                                warn.suppressed_note()
                            );
                        }
                        retry = Some(ACCEPT_RETRY);
                        break;
                    }
                }
            }
        }
    }
}

impl Running {
    /// Stop serving and wait for the thread (at most one scrape's timeouts).
    pub(crate) fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Err(e) = self.waker.wake() {
            log::error!("could not wake the metrics thread to stop it: {e}");
        }
        if self.thread.join().is_err() {
            log::error!("the metrics thread panicked");
        }
    }
}

/// Read one request, answer it, close. `Err` is the reason to log (timeouts, bad requests).
fn answer(mut stream: TcpStream, registry: &Registry) -> Result<(), String> {
    // Accepted sockets do not inherit O_NONBLOCK on Linux, but say what this code relies on.
    stream
        .set_nonblocking(false)
        .map_err(|e| format!("cannot make the socket blocking: {e}"))?;
    let (status, body) = match read_request(&mut stream)? {
        Request::Metrics => {
            let mut body = String::with_capacity(8 * 1024);
            match prometheus_text::encode(&mut body, registry) {
                Ok(()) => ("200 OK", body),
                Err(_) => ("500 Internal Server Error", "encoding failed\n".into()),
            }
        }
        Request::NotFound => ("404 Not Found", "metrics are at /metrics\n".into()),
        Request::BadMethod => ("405 Method Not Allowed", "GET /metrics\n".into()),
        Request::TooLarge => {
            let _ = respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "",
                false,
            );
            return Err(format!("request above {MAX_REQUEST} bytes"));
        }
        Request::Invalid(e) => {
            let _ = respond(&mut stream, "400 Bad Request", "", false);
            return Err(format!("invalid request: {e}"));
        }
    };
    if let Err(e) = respond(&mut stream, status, &body, status.starts_with("200")) {
        return Err(format!("response not taken: {e}"));
    }
    Ok(())
}

enum Request {
    Metrics,
    NotFound,
    BadMethod,
    TooLarge,
    Invalid(httparse::Error),
}

/// Read until the request's headers are complete, [`MAX_REQUEST`] bytes, or the timeout.
fn read_request(stream: &mut TcpStream) -> Result<Request, String> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut buf = [0; MAX_REQUEST];
    let mut len = 0;
    while len < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no whole request within {REQUEST_TIMEOUT:?}"));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buf[len..]) {
            Ok(0) => return Err("closed before a whole request".into()),
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => {
                return Err(format!("no whole request within {REQUEST_TIMEOUT:?}"))
            }
            Err(e) => return Err(format!("read failed: {e}")),
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf[..len]) {
            Ok(httparse::Status::Partial) => {}
            Ok(httparse::Status::Complete(_)) => {
                let path = request.path.unwrap_or("");
                let path = path.split_once('?').map_or(path, |(path, _)| path);
                return Ok(match (request.method, path) {
                    (Some("GET"), "/metrics") => Request::Metrics,
                    (Some("GET"), _) => Request::NotFound,
                    _ => Request::BadMethod,
                });
            }
            Err(httparse::Error::TooManyHeaders) => return Ok(Request::TooLarge),
            Err(e) => return Ok(Request::Invalid(e)),
        }
    }
    Ok(Request::TooLarge)
}

/// Write the whole response within [`RESPONSE_TIMEOUT`], however the peer paces its reads.
fn respond(stream: &mut TcpStream, status: &str, body: &str, metrics: bool) -> io::Result<()> {
    let content_type = if metrics {
        prometheus_text::CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(body.as_bytes());
    let deadline = Instant::now() + RESPONSE_TIMEOUT;
    let mut sent = 0;
    while sent < response.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("not taken within {RESPONSE_TIMEOUT:?}"),
            ));
        }
        // Per call, SO_SNDTIMEO bounds one write; the deadline bounds them all.
        stream.set_write_timeout(Some(left))?;
        match stream.write(&response[sent..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // FIN after the response; the scraper sent no body, so nothing unread turns it into RST.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A figure the OS gives at scrape time.
type ReadNow = fn() -> io::Result<u64>;

/// Everything one scrape reports, read at scrape time.
struct Process {
    handle: Handle,
    /// Scrapes come as fast as a scraper likes: so can warnings about failed reads. Only
    /// this thread takes the lock (the registry hands collectors `&self`).
    warn: Mutex<Throttle>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Process")
    }
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.handle.stats();
        encode_counters(stats, &mut encoder)?;
        let fin = FinToClose(stats.fin_to_close());
        encode(
            &mut encoder,
            "closewait_fin_to_close_seconds",
            "Time from the read that returned 0 (the peer's FIN) to close() of the socket.",
            &fin,
        )?;
        // What the OS says now, not what start-up saw. A failure leaves the metric out (an
        // `absent()` alert can notice) rather than reporting a made-up number.
        let read_now: [(&str, &str, ReadNow); 3] = [
            (
                "closewait_close_wait_sockets",
                "This process's TCP sockets in CLOSE_WAIT (peer closed, not yet closed here), \
                 from netlink sock_diag as ss counts them.",
                own_close_wait,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (RLIMIT_NOFILE soft limit, read now).",
                limits::current_nofile_soft,
            ),
        ];
        for (name, help, read) in read_now {
            match read() {
                Ok(value) => encode(&mut encoder, name, help, &ConstGauge::new(value))?,
                Err(e) => {
                    let mut warn = self.warn.lock().unwrap_or_else(|p| p.into_inner());
                    if warn.allow() {
                        log::warn!("metrics: cannot read {name}: {e}{}", warn.suppressed_note());
                    }
                }
            }
        }
        Ok(())
    }
}

/// Every STATS counter, as the table in `stats.rs` describes it.
fn encode_counters(stats: &Stats, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    for &counter in Counter::ALL {
        let (name, help, value) = (counter.metric_name(), counter.help(), stats.get(counter));
        match (counter.kind(), counter.divisor()) {
            (Kind::Counter, 1) => encode(encoder, name, help, &ConstCounter::new(value))?,
            (Kind::Counter, d) => encode(
                encoder,
                name,
                help,
                &ConstCounter::new(value as f64 / d as f64),
            )?,
            (Kind::Gauge, 1) => encode(encoder, name, help, &ConstGauge::new(value))?,
            (Kind::Gauge, d) => encode(
                encoder,
                name,
                help,
                &ConstGauge::new(value as f64 / d as f64),
            )?,
        }
    }
    // The service's own, named like the server's (`closewait_` + the STATS name).
    for counter in stats.service_counters() {
        let (name, help) = (format!("closewait_{}", counter.name()), counter.help());
        match counter.kind() {
            Kind::Counter => encode(encoder, &name, help, &ConstCounter::new(counter.get()))?,
            Kind::Gauge => encode(encoder, &name, help, &ConstGauge::new(counter.get()))?,
        }
    }
    Ok(())
}

fn encode(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// The FIN-to-close histogram in seconds (Prometheus base unit).
struct FinToClose(HistogramSnapshot);

impl EncodeMetric for FinToClose {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = FIN_TO_CLOSE_BOUNDS_NS
            .iter()
            .zip(&self.0.counts)
            .map(|(&bound, &count)| (bound as f64 / 1e9, count))
            .collect();
        // The encoder adds the +Inf bucket from the total count.
        encoder.encode_histogram::<NoLabelSet>(
            self.0.sum_ns as f64 / 1e9,
            self.0.count(),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Fds open in this process (the directory handle that counts them left out).
fn open_fds() -> io::Result<u64> {
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1) as u64)
}

/// This process's CLOSE_WAIT sockets: the kernel lists every CLOSE_WAIT socket of the network
/// namespace (filtered by state in the kernel, so a host full of TIME_WAIT costs nothing),
/// and an inode found among our fds is ours. The fd scan is skipped when there are none.
fn own_close_wait() -> io::Result<u64> {
    let close_wait = close_wait_inodes()?;
    if close_wait.is_empty() {
        return Ok(0);
    }
    let ours = procfs::socket_inodes(std::process::id())?;
    Ok(close_wait.intersection(&ours).count() as u64)
}

/// Inodes of the TCP sockets (IPv4 and IPv6) in CLOSE_WAIT in this network namespace, asked
/// of the kernel with netlink `sock_diag` as `ss state close-wait` does.
fn close_wait_inodes() -> io::Result<HashSet<u64>> {
    let mut socket = netlink_sys::Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    socket2::SockRef::from(&socket).set_read_timeout(Some(NETLINK_TIMEOUT))?;
    let mut inodes = HashSet::new();
    for (family, socket_id) in [
        (AF_INET, SocketId::new_v4()),
        (AF_INET6, SocketId::new_v6()),
    ] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::CLOSE_WAIT,
                socket_id,
            })
            .into(),
        );
        request.finalize();
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        socket.send(&buf, 0)?;
        read_dump(&socket, &mut inodes)?;
    }
    Ok(inodes)
}

/// Collect the inodes of one dump's answers, up to its `NLMSG_DONE`.
fn read_dump(socket: &netlink_sys::Socket, inodes: &mut HashSet<u64>) -> io::Result<()> {
    let bad = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
    let mut buf = vec![0; NETLINK_BUFFER];
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?.min(buf.len());
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..size])
                .map_err(|e| bad(format!("netlink: {e}")))?;
            match message.payload {
                // Inode 0: the owner already closed it (an orphan), so not ours.
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response))
                    if response.header.inode != 0 =>
                {
                    inodes.insert(u64::from(response.header.inode));
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                _ => {}
            }
            let len = message.header.length as usize;
            if len == 0 {
                return Err(bad("netlink: zero-length message".into()));
            }
            // Messages in a datagram start at 4-byte boundaries (NLMSG_ALIGN).
            offset += (len + 3) & !3;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::Shutdown;

    /// The test process holds a socket in CLOSE_WAIT itself (its peer closed, it did not);
    /// netlink must list it, and count it as ours, exactly as `/proc/net/tcp` does.
    #[test]
    fn sock_diag_counts_our_own_close_wait_socket_like_proc_net_tcp() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (held, _) = listener.accept().unwrap();
        peer.shutdown(Shutdown::Both).unwrap();
        drop(peer);
        let inode = held_inode(&held);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !close_wait_inodes().unwrap().contains(&inode) {
            assert!(
                Instant::now() < deadline,
                "socket {inode} never in CLOSE_WAIT"
            );
            thread::sleep(Duration::from_millis(5));
        }
        assert!(own_close_wait().unwrap() >= 1);
        let from_proc = procfs::tcp_rows(std::process::id())
            .unwrap()
            .iter()
            .any(|row| row.inode == inode && row.state == procfs::TCP_CLOSE_WAIT);
        assert!(from_proc, "/proc/net/tcp disagrees about socket {inode}");
        drop(held);
        assert!(
            !close_wait_inodes().unwrap().contains(&inode),
            "closed, yet listed"
        );
    }

    fn held_inode(stream: &TcpStream) -> u64 {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", stream.as_raw_fd())).unwrap();
        let link = link.to_string_lossy();
        link.trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .unwrap()
    }
}
