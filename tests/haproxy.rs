//! Scale-out behind HAProxy, as operators run it: the distribution's `haproxy` with the
//! shipped `deploy/haproxy.cfg` (only its addresses substituted), three closewait instances,
//! persistent clients through the proxy, and one instance drained and restarted under load.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::fleet::{Fleet, Tally};
use common::*;

/// Persistent clients through the proxy.
const CLIENTS: usize = 100;
/// Clients that connect once the drained instance is back, to see traffic reach it again.
const LATE_CLIENTS: usize = 10;
/// Time between one client's requests: 100 clients then send about 2,000 requests a second.
const PACE: Duration = Duration::from_millis(50);
/// The health check marks a server down after `fall 3` failed checks `inter 2s` apart, and
/// up after `rise 2` good ones (deploy/haproxy.cfg): allow a margin on both.
const CHECK_WAIT: Duration = Duration::from_secs(15);

/// `haproxy -db` in the foreground, its log collected; killed when dropped.
struct Haproxy {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Haproxy {
    /// Run the shipped configuration with the instances' addresses for 127.0.0.1:7881..7883,
    /// and the frontend on `frontend` (a socket bound here on a port the OS picked, passed
    /// as fd 3: HAProxy's `bind fd@3`) for 127.0.0.1:7878.
    fn start(dir: &std::path::Path, frontend: &TcpListener, instances: [SocketAddr; 3]) -> Haproxy {
        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg");
        let mut config = std::fs::read_to_string(shipped).expect("read deploy/haproxy.cfg");
        for (sample, real) in [
            ("bind 127.0.0.1:7878", "bind fd@3".to_string()),
            ("127.0.0.1:7881", instances[0].to_string()),
            ("127.0.0.1:7882", instances[1].to_string()),
            ("127.0.0.1:7883", instances[2].to_string()),
        ] {
            assert!(
                config.contains(sample),
                "deploy/haproxy.cfg has no {sample:?}"
            );
            config = config.replace(sample, &real);
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        // HAProxy with the frontend socket as its fd 3.
        let haproxy = |mode: &str| {
            let mut cmd = command("sh");
            cmd.args(["-c", r#"exec haproxy "$0" -f "$1" 3<&0 </dev/null"#, mode])
                .arg(&path)
                .stdin(Stdio::from(std::os::fd::OwnedFd::from(
                    frontend.try_clone().unwrap(),
                )));
            cmd
        };
        let check = haproxy("-c")
            .output()
            .expect("run haproxy (Debian package haproxy; .ci/run installs it)");
        assert!(
            check.status.success(),
            "haproxy -c: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let mut child = haproxy("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run haproxy");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("TEST_SHOW_LOG").is_some() {
                    eprintln!("haproxy: {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Haproxy { child, log }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Wait (up to `limit`) for a log line with `needle`; how long it took.
    fn wait_for_log(&self, needle: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        let seen = wait_until(limit, || {
            self.log.lock().unwrap().iter().any(|l| l.contains(needle))
        });
        assert!(
            seen,
            "no haproxy log line with {needle:?}: {:#?}",
            self.log()
        );
        start.elapsed()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connections an instance holds (its STATS `active`, less the STATS connection itself).
fn held(server: &Server) -> u64 {
    server.connect().stats()["active"] - 1
}

#[test]
fn one_instance_drained_and_restarted_under_load_behind_haproxy_loses_no_request() {
    let dir = TempDir::new("haproxy");
    let mut instances = [Server::start(&[]), Server::start(&[]), Server::start(&[])];
    let addrs = [instances[0].addr, instances[1].addr, instances[2].addr];
    let baselines: Vec<usize> = instances.iter().map(Server::fds).collect();
    let frontend = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = Haproxy::start(&dir.0, &frontend, addrs);
    let fleet = Fleet::start(frontend.local_addr().unwrap(), CLIENTS, PACE, 6 * WAIT);
    assert!(
        wait_until(WAIT, || fleet.each_answered_at_least(5)),
        "clients did not get going through haproxy: {:?}\n{:#?}",
        fleet.tally,
        proxy.log()
    );
    let spread: Vec<u64> = instances.iter().map(held).collect();
    assert!(spread.iter().all(|&n| n > 0), "leastconn spread {spread:?}");

    // Drain cw2. Its clients see EOF after their replies and reconnect through the proxy.
    let drained = Instant::now();
    instances[1].terminate();
    assert_eq!(instances[1].wait_exit(WAIT), Some(0), "cw2's exit");
    let down_after = proxy.wait_for_log("cw2 is DOWN", CHECK_WAIT) + drained.elapsed();
    // Every client has been answered since, from cw1 or cw3.
    let at_down: Vec<u64> = fleet.per_client.iter().map(|a| Tally::get(a)).collect();
    assert!(
        wait_until(WAIT, || fleet
            .per_client
            .iter()
            .zip(&at_down)
            .all(|(a, &before)| Tally::get(a) > before)),
        "not every client was answered while cw2 was down: {:?}",
        fleet.tally
    );
    let while_down = [held(&instances[0]), held(&instances[2])];

    // Back on its port: the health check brings it up, and new clients reach it.
    instances[1] = Server::start_on(addrs[1], &[]);
    let cw2_baseline = instances[1].fds();
    let up_after = proxy.wait_for_log("cw2 is UP", CHECK_WAIT);
    let late = Fleet::start(frontend.local_addr().unwrap(), LATE_CLIENTS, PACE, 2 * WAIT);
    assert!(
        wait_until(WAIT, || late.each_answered_at_least(5)),
        "late clients: {:?}",
        late.tally
    );
    let cw2_after = held(&instances[1]);

    let (tally, late_tally) = (fleet.stop(), late.stop());
    eprintln!(
        "scale-out: {CLIENTS} clients, spread {spread:?}; cw2 drained, marked DOWN after {} ms; \
         {while_down:?} on cw1 and cw3 while it was down; restarted, marked UP after {} ms; \
         {cw2_after} of {LATE_CLIENTS} later clients on cw2. {} requests answered, {} resent \
         after EOF, {} connections, longest wait {} ms; failures: {} refused, {} reset, {} other",
        down_after.as_millis(),
        up_after.as_millis(),
        Tally::get(&tally.answered) + Tally::get(&late_tally.answered),
        Tally::get(&tally.resent) + Tally::get(&late_tally.resent),
        Tally::get(&tally.connects) + Tally::get(&late_tally.connects),
        Tally::get(&tally.max_wait_us).max(Tally::get(&late_tally.max_wait_us)) / 1000,
        Tally::get(&tally.refused) + Tally::get(&late_tally.refused),
        Tally::get(&tally.reset) + Tally::get(&late_tally.reset),
        Tally::get(&tally.other) + Tally::get(&late_tally.other),
    );
    assert_eq!(
        tally.failures() + late_tally.failures(),
        0,
        "{tally:#?}\n{late_tally:#?}"
    );
    assert!(
        while_down.iter().sum::<u64>() >= CLIENTS as u64,
        "cw1 and cw3 should hold every client while cw2 is down: {while_down:?}"
    );
    // (At least: a health check may be connected at the moment of counting.)
    assert!(
        cw2_after >= LATE_CLIENTS as u64,
        "leastconn sends new clients to the restarted instance: {cw2_after} of {LATE_CLIENTS}"
    );
    // Every client has gone: each instance back to its fds, no CLOSE_WAIT (the proxy runs on).
    let baselines = [baselines[0], cw2_baseline, baselines[2]];
    for (server, &baseline) in instances.iter().zip(&baselines) {
        server.wait_for_fds(baseline);
    }
    eprintln!("scale-out: every instance back to its baseline fds {baselines:?}, no CLOSE_WAIT");
    drop(proxy);
}
