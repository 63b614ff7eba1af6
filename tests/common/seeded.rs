//! What the seeded chaos tests (tests/chaos.rs, tests/pool_chaos.rs) share: a replayable run
//! seed, one seed per peer derived from it, and a peer's socket.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use closewait::testing::WAIT;

/// The run's seed: `var` from the environment to replay a run, else a random one. Printed,
/// with `name`, so any failure can be replayed.
pub fn run_seed(var: &str, name: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .map(|s| s.parse().unwrap_or_else(|_| panic!("{var} is a u64")))
        .unwrap_or_else(rand::random);
    eprintln!("{name}: seed {seed} (rerun with {var}={seed})");
    seed
}

/// The seed of peer `index`'s plan: peers differ, and each replays alone.
pub fn peer_seed(seed: u64, index: usize) -> u64 {
    seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A peer's socket and a clone for its reader thread: bounded by [`WAIT`] in every call, and
/// Nagle off, so each piece the peer writes leaves as its own segment and the server sees
/// the splits.
pub fn peer_stream(addr: SocketAddr) -> Result<(TcpStream, TcpStream), String> {
    let stream = TcpStream::connect_timeout(&addr, WAIT).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    stream.set_nodelay(true).unwrap();
    let reader = stream.try_clone().unwrap();
    Ok((stream, reader))
}

/// Every one of `peers` started within `limit` (`ran` did) and none saw other than the model
/// predicts; a failure names the seed and the first 20 peers' differences.
pub fn assert_every_peer_as_modelled(
    seed: u64,
    failures: &[String],
    ran: usize,
    peers: usize,
    limit: Duration,
) {
    assert!(
        failures.is_empty(),
        "seed {seed}: {} of {ran} peers saw other than the model predicts; first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
    assert_eq!(
        ran, peers,
        "seed {seed}: only {ran} peers started within {limit:?}"
    );
}

/// After its last expected reply, the peer's next read must be the server's EOF.
pub fn expect_eof(mut stream: &TcpStream) -> Result<(), String> {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => Ok(()),
        Ok(_) => Err("more bytes after the last expected reply".into()),
        Err(e) => Err(format!("{e} instead of EOF after every reply")),
    }
}
