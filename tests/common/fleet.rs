//! A fleet of persistent clients that keep sending requests while servers restart around
//! them: each client sends one ECHO at a time with a payload naming it (client, sequence),
//! checks the reply, and when the server ends its connection (EOF before the reply) opens a
//! new one and sends the same request again, as a well-behaved client of a draining server
//! does. Anything else — a refused connect, a reset, a timeout, a wrong reply — is a failure.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{frame, ECHO, ECHO_REPLY, WAIT};

/// Most requests one client sends, whatever the test asks: every load loop is bounded.
const MAX_REQUESTS_PER_CLIENT: u64 = 1_000_000;

/// What the clients counted, summed.
#[derive(Debug, Default)]
pub struct Tally {
    /// Requests answered with the right reply.
    pub answered: AtomicU64,
    /// Requests sent again on a new connection because the server closed the old one first.
    pub resent: AtomicU64,
    /// Connections opened.
    pub connects: AtomicU64,
    /// Longest time from sending a request to its reply, resending included, in µs.
    pub max_wait_us: AtomicU64,
    /// Connections refused.
    pub refused: AtomicU64,
    /// Connections reset (a request on them failed).
    pub reset: AtomicU64,
    /// Any other failure: timeout, wrong reply, short reply.
    pub other: AtomicU64,
    /// The first few failures, to print.
    pub errors: Mutex<Vec<String>>,
}

impl Tally {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }

    pub fn failures(&self) -> u64 {
        Tally::get(&self.refused) + Tally::get(&self.reset) + Tally::get(&self.other)
    }

    fn fail(&self, client: usize, what: &str, e: &io::Error) {
        let counter = match e.kind() {
            io::ErrorKind::ConnectionRefused => &self.refused,
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => &self.reset,
            _ => &self.other,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 10 {
            errors.push(format!("client {client}: {what}: {e}"));
        }
    }
}

/// Running clients; [`Fleet::stop`] ends them.
pub struct Fleet {
    pub tally: Arc<Tally>,
    /// Requests answered, per client.
    pub per_client: Vec<Arc<AtomicU64>>,
    /// Connections opened, per client.
    pub connects_per_client: Vec<Arc<AtomicU64>>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Fleet {
    /// Start `clients` clients against `addr`, each sending a request every `pace` (at most),
    /// until stopped or `limit` has passed.
    pub fn start(addr: SocketAddr, clients: usize, pace: Duration, limit: Duration) -> Fleet {
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + limit;
        let mut fleet = Fleet {
            tally: tally.clone(),
            per_client: Vec::new(),
            connects_per_client: Vec::new(),
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for id in 0..clients {
            let answered = Arc::new(AtomicU64::new(0));
            let connects = Arc::new(AtomicU64::new(0));
            fleet.per_client.push(answered.clone());
            fleet.connects_per_client.push(connects.clone());
            let client = Client {
                id,
                addr,
                tally: tally.clone(),
                answered,
                connects,
            };
            let stop = stop.clone();
            let thread = thread::Builder::new()
                .name(format!("client-{id}"))
                .stack_size(256 * 1024)
                .spawn(move || client.run(&stop, pace, deadline))
                .expect("spawn client thread");
            fleet.threads.push(thread);
        }
        fleet
    }

    /// Requests answered so far, all clients.
    pub fn answered(&self) -> u64 {
        Tally::get(&self.tally.answered)
    }

    /// Whether every client has had at least `n` requests answered.
    pub fn each_answered_at_least(&self, n: u64) -> bool {
        self.per_client.iter().all(|a| Tally::get(a) >= n)
    }

    /// Stop the clients (each closes its connection with a FIN) and wait for them.
    pub fn stop(mut self) -> Arc<Tally> {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            thread.join().expect("client thread");
        }
        self.tally.clone()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

struct Client {
    id: usize,
    addr: SocketAddr,
    tally: Arc<Tally>,
    answered: Arc<AtomicU64>,
    connects: Arc<AtomicU64>,
}

/// How one attempt at a request ended.
enum Outcome {
    Answered,
    /// The server closed the connection before answering: send it again on a new one.
    Closed,
    Failed,
}

impl Client {
    fn run(self, stop: &AtomicBool, pace: Duration, deadline: Instant) {
        let mut conn: Option<TcpStream> = None;
        for seq in 0..MAX_REQUESTS_PER_CLIENT {
            if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
                break;
            }
            let mut payload = (self.id as u64).to_be_bytes().to_vec();
            payload.extend_from_slice(&seq.to_be_bytes());
            let sent = Instant::now();
            loop {
                if Instant::now() >= deadline {
                    return;
                }
                let stream = match &mut conn {
                    Some(stream) => stream,
                    None => match self.connect() {
                        Ok(stream) => conn.insert(stream),
                        Err(e) => {
                            self.tally.fail(self.id, "connect", &e);
                            break;
                        }
                    },
                };
                match self.request(stream, &payload) {
                    Outcome::Answered => {
                        self.answered.fetch_add(1, Ordering::SeqCst);
                        self.tally.answered.fetch_add(1, Ordering::SeqCst);
                        let waited = sent.elapsed().as_micros() as u64;
                        self.tally.max_wait_us.fetch_max(waited, Ordering::SeqCst);
                        break;
                    }
                    Outcome::Closed => {
                        conn = None;
                        self.tally.resent.fetch_add(1, Ordering::SeqCst);
                    }
                    Outcome::Failed => {
                        conn = None;
                        break;
                    }
                }
            }
            thread::sleep(pace);
        }
    }

    fn connect(&self) -> io::Result<TcpStream> {
        let stream = TcpStream::connect_timeout(&self.addr, WAIT)?;
        stream.set_read_timeout(Some(WAIT))?;
        stream.set_write_timeout(Some(WAIT))?;
        stream.set_nodelay(true)?;
        self.connects.fetch_add(1, Ordering::SeqCst);
        self.tally.connects.fetch_add(1, Ordering::SeqCst);
        Ok(stream)
    }

    fn request(&self, stream: &mut TcpStream, payload: &[u8]) -> Outcome {
        if let Err(e) = stream.write_all(&frame(ECHO, payload)) {
            self.tally.fail(self.id, "send", &e);
            return Outcome::Failed;
        }
        let mut reply = vec![0; 5 + payload.len()];
        let first = match stream.read(&mut reply) {
            Ok(0) => return Outcome::Closed,
            Ok(n) => n,
            Err(e) => {
                self.tally.fail(self.id, "receive", &e);
                return Outcome::Failed;
            }
        };
        if let Err(e) = stream.read_exact(&mut reply[first..]) {
            self.tally.fail(self.id, "receive the rest of a reply", &e);
            return Outcome::Failed;
        }
        if reply != frame(ECHO_REPLY, payload) {
            let e = io::Error::other(format!("wrong reply {reply:?}"));
            self.tally.fail(self.id, "check", &e);
            return Outcome::Failed;
        }
        Outcome::Answered
    }
}
