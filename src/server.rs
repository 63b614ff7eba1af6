//! The event loop: the only code that calls `Poll::poll`.
//!
//! One turn: wait for events (or the next deadline), hand each to its connection and note
//! the verdicts, close what must close (all of it in this turn: that is what keeps sockets
//! out of CLOSE_WAIT), expire idle connections, then accept — last, so a slab key freed in
//! this turn is never reused while events of this batch could still name it (mio #219).
//!
//! With `workers > 1` each worker thread runs this same loop with its own poll, slab and
//! `SO_REUSEPORT` listener, and its share of the connection cap; counters are shared.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::codec::Codec;
use crate::connection::{CloseReason, Connection, Io, Readiness, Step, READ_CHUNK};
use crate::connections::Registry;
use crate::deferred::{Deferrals, Inbox};
use crate::leak::{self, EofPolicy};
use crate::limits::{self, AcceptError, AcceptGate, Transition};
use crate::memory::{self, MemoryBudget};
use crate::service::{Reference, Service};
use crate::stats::{Counter, ServiceCounter, Stats};
use crate::throttle::Throttle;
use crate::{listener, metrics, systemd, Config, WhenFull};

const LISTENER: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);

/// Events taken from the kernel per `poll`.
const EVENTS_CAPACITY: usize = 1024;
/// Connections accepted per turn before existing connections get their turn again.
const ACCEPTS_PER_TURN: usize = 256;
/// At most one "still out of fds" / "cap reached" line per this long.
const STATE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A bound server, ready to [`run`](Server::run).
///
/// ```
/// use closewait::{Config, Server};
///
/// let config = Config { listen: "127.0.0.1:0".parse().unwrap(), ..Config::default() };
/// let server = Server::bind(config)?;
/// let addr = server.local_addr();         // the port the OS picked
/// let handle = server.handle();
/// let thread = std::thread::spawn(move || server.run());
///
/// let mut client = std::net::TcpStream::connect(addr)?;
/// use std::io::{Read, Write};
/// client.write_all(&[0, 0, 0, 1, closewait::service::PING])?;
/// let mut pong = [0; 5];
/// client.read_exact(&mut pong)?;
/// assert_eq!(pong, [0, 0, 0, 1, closewait::service::PING_REPLY]);
///
/// handle.shutdown();                      // graceful: flush, close, return
/// thread.join().unwrap()?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct Server<S = Reference> {
    config: Config,
    eof_policy: EofPolicy,
    local_addr: SocketAddr,
    workers: Vec<WorkerParts>,
    shared: Arc<Shared>,
    make_service: Arc<dyn Fn() -> S + Send + Sync>,
    metrics: Option<metrics::Exporter>,
}

struct WorkerParts {
    poll: Poll,
    listener: TcpListener,
    cap: usize,
    max_buffered: usize,
    signals: Option<Signals>,
}

/// What the workers and every [`Handle`] share.
struct Shared {
    stop: AtomicBool,
    /// Each worker's waker, with its mailbox of deferred replies.
    inboxes: Vec<Arc<Inbox>>,
    stats: Stats,
    /// Tell systemd when the drain starts (`Config::systemd`).
    systemd: bool,
}

impl Shared {
    fn request_stop(&self) {
        if !self.stop.swap(true, Ordering::SeqCst) && self.systemd {
            systemd::notify_stopping();
        }
        for inbox in &self.inboxes {
            if let Err(e) = inbox.wake() {
                log::error!("could not wake a worker to stop it: {e}");
            }
        }
    }
}

/// Controls a running server from another thread.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Begin a graceful shutdown: stop accepting, answer what was received, flush, close,
    /// and let [`Server::run`] return (within the drain timeout).
    pub fn shutdown(&self) {
        self.shared.request_stop();
    }

    /// The live counters (the same numbers the STATS request reports).
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }
}

impl Server<Reference> {
    /// Bind a server speaking the reference protocol (ECHO, PING, STATS).
    pub fn bind(config: Config) -> io::Result<Server<Reference>> {
        Server::with_service(config, || Reference)
    }
}

impl<S: Service + 'static> Server<S> {
    /// Bind a server whose requests are answered by services made by `make_service`, one
    /// per worker thread.
    ///
    /// This raises `RLIMIT_NOFILE` to its hard limit, derives the connection cap (see
    /// `docs/fd-budget.md`), opens the listener(s) and, if asked, the signal handler.
    pub fn with_service<F>(config: Config, make_service: F) -> io::Result<Server<S>>
    where
        F: Fn() -> S + Send + Sync + 'static,
    {
        Server::with_policy(config, EofPolicy::Close, make_service)
    }

    /// [`Server::with_service`], with the reference behaviour on a peer's FIN or the leak
    /// (only the demo binary and the load test ask for the leak, through `demo::run`).
    pub(crate) fn with_policy<F>(
        config: Config,
        eof_policy: EofPolicy,
        make_service: F,
    ) -> io::Result<Server<S>>
    where
        F: Fn() -> S + Send + Sync + 'static,
    {
        config.validate().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid configuration: {e}"),
            )
        })?;
        let config = leak::defences(eof_policy, config);
        let workers = config.workers;
        if eof_policy == EofPolicy::Leak {
            log::warn!(
                "LEAKY MODE: this server deliberately never closes a connection whose peer closed \
                 (it stays in CLOSE_WAIT), and has no connection cap and no idle timeout. It WILL \
                 run out of file descriptors. Use it only to reproduce the leak."
            );
        }
        let nofile = limits::raise_nofile_limit()?;
        // Before counting fds, so the budget knows the metrics listener's.
        let metrics = config.metrics.map(metrics::Exporter::bind).transpose()?;
        let open_at_start = count_own_fds();
        let budget =
            limits::derive_budget(nofile.soft, open_at_start, workers, config.max_connections)
                .map_err(|e| io::Error::other(e.to_string()))?;
        if config
            .max_connections
            .is_some_and(|asked| asked > budget.allowed)
        {
            log::warn!(
                "--max-connections {} is more than the fd limit allows: RLIMIT_NOFILE {} minus {} \
                 reserved fds leaves {}; using {}. To allow more, raise the limit (ulimit -n; nofile \
                 in /etc/security/limits.conf; LimitNOFILE= in the systemd unit)",
                config.max_connections.unwrap_or(0),
                nofile.soft,
                budget.reserve,
                budget.allowed,
                budget.allowed
            );
        }
        let cap = leak::connection_cap(eof_policy, budget.max_connections);
        log::info!(
            "fd limit: soft {} (was {}), hard {}; {} fds open at start; max_connections {}",
            nofile.soft,
            nofile.soft_at_start,
            nofile.hard,
            open_at_start,
            if cap == usize::MAX {
                "unlimited (leaky)".to_string()
            } else {
                cap.to_string()
            }
        );

        let max_buffered = match config.max_buffered {
            Some(bytes) => {
                log::info!("memory budget: {bytes} bytes in partial frames and pending replies");
                bytes
            }
            None => match memory::default_max_buffered() {
                Some((bytes, source)) => {
                    log::info!(
                        "memory budget: {bytes} bytes in partial frames and pending replies \
                         ({source}; set --max-buffered to choose)"
                    );
                    bytes
                }
                None => {
                    log::warn!(
                        "memory budget: none (cannot read /proc/meminfo); set --max-buffered"
                    );
                    usize::MAX
                }
            },
        };

        let mut parts = Vec::with_capacity(workers);
        let mut inboxes = Vec::with_capacity(workers);
        let inherited = if config.systemd {
            systemd::take_listener()?
        } else {
            None
        };
        let listeners = listener::open_all(&config, workers, inherited)?;
        let local_addr = listeners[0].local_addr()?;
        for (index, listener) in listeners.into_iter().enumerate() {
            let poll = Poll::new()?;
            inboxes.push(Arc::new(Inbox::new(Waker::new(poll.registry(), WAKER)?)));
            let signals = if config.handle_signals && index == 0 {
                let mut signals = Signals::new([SIGINT, SIGTERM])?;
                poll.registry()
                    .register(&mut signals, SIGNALS, Interest::READABLE)?;
                Some(signals)
            } else {
                None
            };
            parts.push(WorkerParts {
                poll,
                listener,
                cap: limits::split_cap(cap, workers, index),
                max_buffered: limits::split_cap(max_buffered, workers, index),
                signals,
            });
        }

        let stats = Stats::default();
        stats.set(
            Counter::MaxConnections,
            if cap == usize::MAX { 0 } else { cap as u64 },
        );
        stats.set(Counter::FdLimit, nofile.soft);
        stats.set(
            Counter::MaxBuffered,
            if max_buffered == usize::MAX {
                0
            } else {
                max_buffered as u64
            },
        );
        stats.set(Counter::Workers, workers as u64);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            inboxes,
            stats,
            systemd: config.systemd,
        });
        Ok(Server {
            config,
            eof_policy,
            local_addr,
            workers: parts,
            shared,
            make_service: Arc::new(make_service),
            metrics,
        })
    }

    /// The address the server listens on (with the port the OS chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the Prometheus endpoint ([`Config::metrics`]), with the port the OS
    /// chose for port 0; `None` when metrics are off.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(metrics::Exporter::local_addr)
    }

    /// Show a counter of the service's own in STATS and the metrics, next to the server's
    /// (make it with [`ServiceCounter::counter`], give clones to the services). Returns the
    /// server, to chain after [`Server::with_service`].
    ///
    /// # Panics
    ///
    /// If its name is already taken (by the server's counters or another of the service's).
    pub fn register(self, counter: &ServiceCounter) -> Self {
        self.shared.stats.register(counter);
        self
    }

    /// A handle to stop the server or read its counters from another thread.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    /// Serve until [`Handle::shutdown`] or SIGINT/SIGTERM (when `handle_signals` is set),
    /// then drain and return. Worker 0 runs on the calling thread.
    pub fn run(self) -> io::Result<()> {
        let Server {
            config,
            eof_policy,
            local_addr,
            workers,
            shared,
            make_service,
            metrics,
        } = self;
        log::info!("serving {local_addr} with {} worker(s)", workers.len());
        if config.systemd {
            // The listener is open: connections from now on are queued, then accepted.
            systemd::notify_ready(local_addr, workers.len());
        }
        let metrics = match metrics {
            Some(exporter) => Some(exporter.spawn(Handle {
                shared: shared.clone(),
            })?),
            None => None,
        };
        let mut threads = Vec::new();
        let mut first = None;
        for (index, parts) in workers.into_iter().enumerate() {
            let worker = (config.clone(), shared.clone(), make_service.clone());
            if index == 0 {
                first = Some((parts, worker));
                continue;
            }
            let thread = thread::Builder::new()
                .name(format!("closewait-{index}"))
                .spawn(move || {
                    let (config, shared, make_service) = worker;
                    Worker::new(index, parts, &config, eof_policy, shared, make_service()).run()
                })?;
            threads.push(thread);
        }
        let mut result = match first {
            Some((parts, (config, shared, make_service))) => {
                Worker::new(0, parts, &config, eof_policy, shared, make_service()).run()
            }
            None => Ok(()),
        };
        if result.is_err() {
            // One worker failed: the others must not keep serving a half-dead server.
            shared.request_stop();
        }
        for thread in threads {
            let outcome = thread
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a worker thread panicked")));
            if result.is_ok() {
                result = outcome;
            }
        }
        // Last, so the drain can be watched; a scrape in progress ends within its timeouts.
        if let Some(metrics) = metrics {
            metrics.stop();
        }
        log::info!("stopped; {}", shared.stats.summary());
        result
    }
}

/// The earlier of two optional deadlines (`None` is "never"). A plain fold, because
/// `poll_timeout` runs every turn and iterator adapters over `Option`s cost more here.
#[inline]
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Before closing a socket we refuse (over the cap), send our FIN behind the reply and take
/// what the client has sent already: a close with unread input is a reset, which a client
/// reads as a failure (and which drops a reply still in flight). Bounded: a client that
/// sends more than this before reading why gets the reset.
fn discard_arrived(stream: &mut TcpStream) {
    use std::io::Read;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

/// Fds open in this process now (the directory handle used to count them excluded).
fn count_own_fds() -> u64 {
    match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir.count().saturating_sub(1) as u64,
        Err(e) => {
            // Without /proc, assume stdio only; the safety margin covers the difference.
            log::warn!("cannot count open fds from /proc/self/fd: {e}; assuming 3");
            3
        }
    }
}

/// One event loop: a poll, a listener, a slab of connections.
struct Worker<S: Service> {
    index: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    listener_registered: bool,
    signals: Option<Signals>,
    registry: Registry<S::Session>,
    gate: AcceptGate,
    cap: usize,
    accept_pending: bool,
    shared: Arc<Shared>,
    service: S,
    codec: S::Codec,
    input: Box<[u8]>,
    output: Vec<u8>,
    /// Verdicts of this turn, acted on after the event batch.
    closing: Vec<(Token, CloseReason)>,
    /// Connections to run again next turn without an event (read budget spent, resumed, or
    /// just lingering).
    again: Vec<Token>,
    memory: MemoryBudget,
    /// When each connection read its peer's FIN (filled through `Io::fins`), until `reap`
    /// closes it: the FIN-to-close histogram. Kept here, not in `Connection`, so only closing
    /// connections pay for it; it holds about one turn's FINs (at most one per event), plus
    /// connections still flushing to a half-closed peer (and, in the leaky variant, every
    /// leaked one).
    eof_at: HashMap<Token, Instant>,
    /// Replies held behind requests waiting for a deferred reply, by connection; empty
    /// unless a service defers. Completions arrive in `shared.inboxes[index]`.
    deferrals: Deferrals,
    drain_deadline: Option<Instant>,
    warn: Throttle,
    state_log: Throttle,
    emfile_log: Throttle,
    recovery_log: Throttle,
    when_full: WhenFull,
    max_frame: usize,
    max_pending_output: usize,
    eof_policy: EofPolicy,
    drain_timeout: Duration,
    frame_timeout: Option<Duration>,
    linger: bool,
}

impl<S: Service> Worker<S> {
    fn new(
        index: usize,
        parts: WorkerParts,
        config: &Config,
        eof_policy: EofPolicy,
        shared: Arc<Shared>,
        service: S,
    ) -> Worker<S> {
        let WorkerParts {
            poll,
            listener,
            cap,
            max_buffered,
            signals,
        } = parts;
        Worker {
            index,
            poll,
            listener: Some(listener),
            listener_registered: false,
            signals,
            registry: Registry::new(
                config.idle_timeout,
                config.frame_timeout,
                config.linger_timeout,
            ),
            gate: AcceptGate::default(),
            cap,
            accept_pending: true,
            service,
            codec: S::Codec::default(),
            input: vec![0; READ_CHUNK].into_boxed_slice(),
            output: Vec::with_capacity(READ_CHUNK),
            closing: Vec::new(),
            again: Vec::new(),
            memory: MemoryBudget::new(max_buffered),
            eof_at: HashMap::new(),
            deferrals: Deferrals::new(Some(shared.inboxes[index].clone())),
            drain_deadline: None,
            warn: Throttle::default(),
            state_log: Throttle::new(1, STATE_LOG_INTERVAL),
            emfile_log: Throttle::new(1, STATE_LOG_INTERVAL),
            recovery_log: Throttle::new(1, STATE_LOG_INTERVAL),
            when_full: config.when_full,
            max_frame: config.max_frame,
            max_pending_output: config.max_pending_output,
            eof_policy,
            drain_timeout: config.drain_timeout,
            frame_timeout: config.frame_timeout,
            linger: config.linger_timeout.is_some(),
            shared,
        }
    }

    fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        self.set_listening(true)?;
        loop {
            let timeout = self.poll_timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            for token in std::mem::take(&mut self.again) {
                self.drive(token, now, |conn, io| conn.on_event(io, Readiness::RETRY));
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_pending = true,
                    // Shutdown, or replies completed on other threads.
                    WAKER => self.on_completions(now),
                    SIGNALS => self.on_signals(),
                    token => {
                        // A read-closed hint is read like readable: only a read returning 0
                        // proves the FIN, and data may arrive with it.
                        let ready = Readiness {
                            readable: event.is_readable() || event.is_read_closed(),
                            read_closed: event.is_read_closed(),
                            writable: event.is_writable(),
                            error: event.is_error(),
                        };
                        self.drive(token, now, |conn, io| conn.on_event(io, ready));
                    }
                }
            }
            if self.shared.stop.load(Ordering::Relaxed) && self.drain_deadline.is_none() {
                self.begin_shutdown(now);
            }
            self.reap(now);
            self.expire(now);
            self.report_suppressed(now);
            if let Some(deadline) = self.drain_deadline {
                if self.registry.is_empty() {
                    return Ok(());
                }
                if now >= deadline {
                    log::warn!(
                        "drain timeout: closing {} connection(s) with replies unsent",
                        self.registry.len()
                    );
                    for token in self.registry.tokens() {
                        self.closing.push((token, CloseReason::Shutdown));
                    }
                    self.reap(now);
                    return Ok(());
                }
                continue;
            }
            if self.gate.retry_at().is_some_and(|at| at <= now) {
                self.reopen_gate(now);
            }
            if self.accept_pending && self.gate.is_open() {
                self.accept(now);
            }
        }
    }

    /// How long `poll` may sleep: until the next deadline, or not at all if work is queued.
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.again.is_empty()
            || (self.accept_pending && self.gate.is_open() && self.drain_deadline.is_none())
        {
            return Some(Duration::ZERO);
        }
        let mut next = earliest(self.registry.next_deadline(), self.gate.retry_at());
        next = earliest(next, self.drain_deadline);
        if self.has_suppressed_lines() {
            for throttle in [
                &self.warn,
                &self.state_log,
                &self.emfile_log,
                &self.recovery_log,
            ] {
                next = earliest(next, throttle.report_due());
            }
        }
        next.map(|deadline| deadline.saturating_duration_since(now))
    }

    /// Run `f` on the connection behind `token` (if it is still open) and file its verdict;
    /// then, if the connections hold more than the memory budget, evict the largest.
    fn drive(
        &mut self,
        token: Token,
        now: Instant,
        f: impl FnOnce(&mut Connection<S::Session>, &mut Io<'_, S>) -> Step,
    ) {
        self.drive_one(token, now, f);
        if self.memory.is_exceeded() {
            self.enforce_memory_budget(now);
        }
    }

    #[inline]
    fn drive_one(
        &mut self,
        token: Token,
        now: Instant,
        f: impl FnOnce(&mut Connection<S::Session>, &mut Io<'_, S>) -> Step,
    ) {
        let Some(conn) = self.registry.get_mut(token) else {
            return; // closed earlier: a stale event (mio #219), nothing to do
        };
        let held_before = conn.buffered() + self.deferrals.held(token);
        let mut io = Io {
            input: &mut self.input,
            output: &mut self.output,
            service: &mut self.service,
            codec: &mut self.codec,
            stats: &self.shared.stats,
            warn: &mut self.warn,
            max_frame: self.max_frame,
            max_pending_output: self.max_pending_output,
            eof_policy: self.eof_policy,
            linger: self.linger,
            fins: &mut self.eof_at,
            deferrals: &mut self.deferrals,
            token,
        };
        let step = f(conn, &mut io);
        let held_after = conn.buffered() + self.deferrals.held(token);
        let progressed = conn.take_progress();
        let (began, in_frame) = (conn.take_frame_began(), conn.in_frame());
        if progressed {
            self.registry.touch(token, now);
        }
        self.registry.track_frame(token, began, in_frame, now);
        self.account(held_before, held_after);
        match step {
            Step::Continue => {}
            Step::Again => self.again.push(token),
            Step::Close(reason) => self.closing.push((token, reason)),
            Step::Linger => {
                self.registry.start_linger(token, now);
                self.shared.stats.add(Counter::Lingering, 1);
                // Input that arrived while draining raised its edge already: read it now.
                self.again.push(token);
            }
        }
    }

    /// A connection went from holding `before` to `after` bytes: the budget and the gauge.
    #[inline]
    fn account(&mut self, before: usize, after: usize) {
        if before != after {
            self.memory.record(before, after);
            let stats = &self.shared.stats;
            if after > before {
                stats.add(Counter::BufferedBytes, (after - before) as u64);
            } else {
                stats.sub(Counter::BufferedBytes, (before - after) as u64);
            }
        }
    }

    /// Deferred replies completed on other threads: put what is now in request order into
    /// its connection's output and flush it (this is where deferred replies enter the loop).
    /// Out of line: a service that never defers never gets here.
    #[cold]
    #[inline(never)]
    fn on_completions(&mut self, now: Instant) {
        let mut released = Vec::new();
        for done in self.shared.inboxes[self.index].take() {
            released.clear();
            // Replies released from the queue leave its account here; the connection's
            // output, where they go, is accounted by `drive`.
            let token = done.token;
            let held_before = self.deferrals.held(token);
            let applied = self.deferrals.apply(done, &mut released);
            let held_after = self.deferrals.held(token);
            self.account(held_before, held_after);
            if let Some(token) = applied {
                let replies = std::mem::take(&mut released);
                self.drive(token, now, |conn, io| conn.on_deferred(io, &replies));
                released = replies;
            }
        }
    }

    /// Close the connections holding the most until all together are back under the budget.
    /// Each eviction leaves its victim holding nothing (or one ERROR frame), so this ends.
    fn enforce_memory_budget(&mut self, now: Instant) {
        let limit = self.memory.limit();
        while self.memory.is_exceeded() {
            let deferrals = &self.deferrals;
            let Some((victim, _)) = self.registry.largest_holder(|token| deferrals.held(token))
            else {
                return;
            };
            self.drive_one(victim, now, |conn, io| conn.evict(io, limit));
        }
    }

    /// The one close path: every reason ends here, is counted once, and frees the slot.
    fn reap(&mut self, now: Instant) {
        if self.closing.is_empty() {
            return;
        }
        let stats = &self.shared.stats;
        for (token, trigger) in self.closing.drain(..) {
            let Some(mut conn) = self.registry.remove(self.poll.registry(), token) else {
                continue; // already closed this turn
            };
            // A lingering close was decided earlier; the linger or drain timeout ending it
            // does not change why.
            let reason = match conn.lingering() {
                Some(reason) => {
                    stats.sub(Counter::Lingering, 1);
                    reason
                }
                None => trigger,
            };
            let held = conn.buffered() + self.deferrals.held(token);
            if held > 0 {
                self.memory.record(held, 0);
                stats.sub(Counter::BufferedBytes, held as u64);
            }
            if trigger == CloseReason::WriteStall {
                // Abortive close: the kernel drops our queued output now instead of holding
                // it (and the fd's memory) for a peer that is not reading.
                let _ = socket2::SockRef::from(conn.stream_mut() as &TcpStream)
                    .set_linger(Some(Duration::ZERO));
            }
            if reason.is_abnormal() {
                if self.warn.allow() {
                    log::warn!(
                        "{}: closed: {reason}{}",
                        conn.peer(),
                        self.warn.suppressed_note()
                    );
                }
            } else {
                log::debug!("{}: closed: {reason}", conn.peer());
            }
            // close(2) here; the session goes back to the service after it, so nothing the
            // service does in `close` can hold the socket open.
            let session = conn.into_session();
            // Its late deferred replies answer nobody (and never a new connection here).
            self.deferrals.forget(token);
            if let Some(at) = self.eof_at.remove(&token) {
                stats.observe_fin_to_close(at.elapsed());
            }
            // `active` drops last: whoever sees it drop (STATS, /metrics, a test) also sees
            // the socket closed and the close counted under its reason.
            stats.add(reason.counter(), 1);
            stats.sub(Counter::Active, 1);
            self.service.close(session, reason);
        }
        // A freed fd raises no event: if accept was paused (cap or EMFILE), retry now.
        if !self.gate.is_open() && self.drain_deadline.is_none() {
            self.reopen_gate(now);
        }
    }

    /// Act on every deadline that passed: idle connections close, unfinished frames get an
    /// ERROR and a lingering close, lingering connections close.
    fn expire(&mut self, now: Instant) {
        while let Some(token) = self.registry.pop_idle(now) {
            let Some(conn) = self.registry.get_mut(token) else {
                continue;
            };
            let reason = if conn.has_pending_output() || conn.is_read_paused() {
                CloseReason::WriteStall
            } else {
                CloseReason::Idle
            };
            self.closing.push((token, reason));
        }
        if let Some(timeout) = self.frame_timeout {
            while let Some(token) = self.registry.pop_frame(now) {
                self.drive(token, now, |conn, io| conn.on_frame_timeout(io, timeout));
            }
        }
        while let Some(token) = self.registry.pop_linger(now) {
            if let Some(reason) = self.registry.get_mut(token).and_then(|c| c.lingering()) {
                log::debug!("{token:?}: linger timeout; closing ({reason})");
                self.closing.push((token, reason));
            }
        }
        self.reap(now);
    }

    /// Whether any throttle dropped lines not yet reported (rare: checked first, since the
    /// loop asks every turn).
    fn has_suppressed_lines(&self) -> bool {
        self.warn.report_due().is_some()
            || self.state_log.report_due().is_some()
            || self.emfile_log.report_due().is_some()
            || self.recovery_log.report_due().is_some()
    }

    /// Say how many lines each throttle dropped once its window is over, even when no later
    /// line comes to carry the count (a burst of 3,000 idle closes, then silence).
    fn report_suppressed(&mut self, now: Instant) {
        if !self.has_suppressed_lines() {
            return;
        }
        for (throttle, what) in [
            (&mut self.warn, "warnings about peers"),
            (&mut self.state_log, "connection-cap lines"),
            (&mut self.emfile_log, "accept-failure lines"),
            (&mut self.recovery_log, "accept-recovery lines"),
        ] {
            if let Some((count, window)) = throttle.take_overdue(now) {
                log::warn!("{count} similar {what} suppressed in the last {window:?}");
            }
        }
    }

    /// Accept until the backlog is empty, the cap is reached, or fds run out.
    fn accept(&mut self, now: Instant) {
        self.accept_pending = false;
        for _ in 0..ACCEPTS_PER_TURN {
            if self.registry.len() >= self.cap && self.when_full == WhenFull::Wait {
                self.pause_at_cap(now);
                return;
            }
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    if let Transition::Recovered(failures) = self.gate.accepted() {
                        if self.recovery_log.allow() {
                            log::info!(
                                "accepting again after {failures} failed accept(s) for lack of fds{}",
                                self.recovery_log.suppressed_note()
                            );
                        }
                    }
                    self.shared.stats.add(Counter::Accepted, 1);
                    if self.registry.len() >= self.cap {
                        self.reject(stream, peer);
                        continue;
                    }
                    let service = &mut self.service;
                    let open = || service.open(peer);
                    match self
                        .registry
                        .insert(self.poll.registry(), stream, peer, open, now)
                    {
                        Ok(_) => {
                            self.shared.stats.add(Counter::Active, 1);
                            log::debug!("{peer}: connected");
                        }
                        Err(e) => log::warn!("{peer}: cannot register with poll: {e}; closing it"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => match limits::classify_accept_error(&e) {
                    AcceptError::Skip => log::debug!("accept: {e} (skipped)"),
                    kind => {
                        self.on_accept_exhausted(&e, kind, now);
                        return;
                    }
                },
            }
        }
        // Budget spent with connections possibly still queued: continue next turn.
        self.accept_pending = true;
    }

    fn on_accept_exhausted(&mut self, e: &io::Error, kind: AcceptError, now: Instant) {
        if kind == AcceptError::Exhausted {
            self.shared.stats.add(Counter::EmfileEvents, 1);
        }
        let open = self.registry.len();
        // Re-read: an operator may have changed the limit of the running process
        // (`prlimit --pid`), and a stale number in this line would mislead whoever reads it.
        let limit = match limits::current_nofile_soft() {
            Ok(soft) => {
                self.shared.stats.set(Counter::FdLimit, soft);
                soft
            }
            Err(_) => self.shared.stats.get(Counter::FdLimit),
        };
        // At the limit, every close frees one fd that the next accept takes, so fds can flap
        // between "failing" and "recovered" many times a second: both lines are throttled.
        match self.gate.exhausted(now) {
            Transition::ExhaustedStart(delay) if self.emfile_log.allow() => log::warn!(
                "accept failed: {e}; {open} connections open, fd limit {limit}; not accepting for \
                 {delay:?} (open connections are still served; retrying when one closes){}",
                self.emfile_log.suppressed_note()
            ),
            Transition::ExhaustedAgain(delay) if self.emfile_log.allow() => {
                log::warn!(
                    "accept still failing: {e}; next retry in {delay:?}{}",
                    self.emfile_log.suppressed_note()
                )
            }
            _ => {}
        }
        self.set_listening(false)
            .unwrap_or_else(|e| log::error!("cannot pause the listener: {e}"));
    }

    fn pause_at_cap(&mut self, now: Instant) {
        if self.gate.full(now) == Transition::Paused {
            self.shared.stats.add(Counter::AcceptPauses, 1);
            if self.state_log.allow() {
                log::warn!(
                    "connection cap reached ({} open): new connections wait in the listen backlog{}",
                    self.registry.len(),
                    self.state_log.suppressed_note()
                );
            }
        }
        self.set_listening(false)
            .unwrap_or_else(|e| log::error!("cannot pause the listener: {e}"));
    }

    /// A slot or an fd may be free: accept again (the queued connections raise no new event).
    fn reopen_gate(&mut self, now: Instant) {
        if let Transition::Resumed(paused) = self.gate.retry(now) {
            self.shared
                .stats
                .add(Counter::AcceptPausedMs, paused.as_millis() as u64);
            log::debug!("accepting again after {paused:?} at the cap");
        }
        // Connections already queued raise no new edge. Re-registering the listener below
        // happens to report them (epoll signals a ready fd when it is added), but accepting
        // on our own does not depend on that, nor on pausing by deregistration.
        self.accept_pending = true;
        self.set_listening(true)
            .unwrap_or_else(|e| log::error!("cannot resume the listener: {e}"));
    }

    /// Register or deregister the listener, so a paused server takes no wake-ups from SYNs.
    fn set_listening(&mut self, on: bool) -> io::Result<()> {
        let Some(listener) = &mut self.listener else {
            return Ok(());
        };
        if on == self.listener_registered {
            return Ok(());
        }
        if on {
            self.poll
                .registry()
                .register(listener, LISTENER, Interest::READABLE)?;
        } else {
            self.poll.registry().deregister(listener)?;
        }
        self.listener_registered = on;
        Ok(())
    }

    /// `--when-full reject`: tell the client why and close, rather than keep it waiting.
    fn reject(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        use std::io::Write;
        let message = format!("server full: {} connections", self.registry.len());
        let mut reply = Vec::with_capacity(message.len() + 16);
        S::Codec::encode_error(&mut reply, &message);
        // A fresh socket's send buffer always has room for one small frame.
        if let Err(e) = stream.write(&reply) {
            log::debug!("{peer}: could not send the rejection: {e}");
        }
        discard_arrived(&mut stream);
        self.shared.stats.add(Counter::Rejected, 1);
        if self.warn.allow() {
            log::warn!("{peer}: rejected: {message}{}", self.warn.suppressed_note());
        }
    }

    fn on_signals(&mut self) {
        let Some(signals) = &mut self.signals else {
            return;
        };
        let mut got = None;
        for signal in signals.pending() {
            got = Some(signal);
        }
        if let Some(signal) = got {
            let name = if signal == SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            log::info!("{name} received: shutting down gracefully");
            self.shared.request_stop();
        }
    }

    /// Stop accepting, answer what was received, then let the loop drain and exit.
    fn begin_shutdown(&mut self, now: Instant) {
        if let Some(mut listener) = self.listener.take() {
            if self.listener_registered {
                let _ = self.poll.registry().deregister(&mut listener);
            }
        }
        self.drain_deadline = Some(now + self.drain_timeout);
        self.again.clear();
        log::info!(
            "worker {}: draining {} connection(s)",
            self.index,
            self.registry.len()
        );
        for token in self.registry.tokens() {
            self.drive(token, now, |conn, io| conn.begin_shutdown(io));
        }
    }
}
