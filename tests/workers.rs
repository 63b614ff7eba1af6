//! `--workers N`: N event loops sharing one port through SO_REUSEPORT, counters summed.

mod common;

use common::*;

#[test]
fn two_workers_share_the_port_the_cap_and_the_counters() {
    let server = Server::start(&["--workers", "2", "--max-connections", "101"]);
    // The second worker's thread starts after the listening line is printed.
    let threads = || {
        std::fs::read_dir(format!("/proc/{}/task", server.pid()))
            .unwrap()
            .count()
    };
    assert!(
        wait_until(WAIT, || threads() == 2),
        "one thread per worker, saw {}",
        threads()
    );
    let baseline = server.fds();
    let mut clients: Vec<Client> = (0..60).map(|_| server.connect()).collect();
    for (i, client) in clients.iter_mut().enumerate() {
        client.echo(format!("{i}").as_bytes());
    }
    let stats = clients[0].stats();
    assert_eq!(
        (stats["workers"], stats["max_connections"]),
        (2, 101),
        "{stats:?}"
    );
    assert_eq!((stats["accepted"], stats["active"]), (60, 60), "{stats:?}");
    drop(clients);
    server.wait_for_fds(baseline);
    let stats = server.connect().stats();
    assert_eq!(stats["closed_eof"], 60, "{stats:?}");
}
