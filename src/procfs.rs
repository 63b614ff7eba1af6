//! Read a process's open descriptors and its sockets' TCP states from Linux `/proc`.
//!
//! This is how you find a CLOSE_WAIT leak from outside a process (what `lsof` and
//! `ss -tanp state close-wait` show), and how the tests and the load test measure one. The
//! parser is pure so it can be tested on recorded lines; only the two small readers touch
//! `/proc`. Linux only; `/proc/net/tcp` is O(all sockets), fine for tests and a 1 Hz monitor.

use std::collections::HashSet;
use std::fs;
use std::io;

/// Kernel TCP state code for CLOSE_WAIT (`include/net/tcp_states.h`), as `/proc/net/tcp` prints it.
pub const TCP_CLOSE_WAIT: u8 = 0x08;
/// Kernel TCP state code for ESTABLISHED.
pub const TCP_ESTABLISHED: u8 = 0x01;
/// Kernel TCP state code for LISTEN.
pub const TCP_LISTEN: u8 = 0x0A;

/// The `tr` value of a socket whose keepalive timer is armed (`ss -o` shows `keepalive`).
pub const TIMER_KEEPALIVE: u8 = 2;

/// One row of `/proc/net/tcp` or `/proc/net/tcp6`: the socket's state, queues and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpRow {
    /// State code (see the `TCP_*` constants).
    pub state: u8,
    /// The socket's local port (a server's accepted sockets have the listening port).
    pub local_port: u16,
    /// Bytes sent but not yet acknowledged by the peer (on loopback: the peer's receive
    /// window is full, i.e. it is not reading). `ss` shows it as Send-Q.
    pub tx_queue: u64,
    /// Bytes received but not yet read by the owner (`ss` Recv-Q). On a CLOSE_WAIT socket it
    /// is 1 while the FIN itself is unread, 0 once the owner read the EOF but never closed.
    pub rx_queue: u64,
    /// Which kernel timer runs on the socket (`tr`): 0 none, 1 retransmit, 2 keepalive
    /// ([`TIMER_KEEPALIVE`]), 3 TIME_WAIT, 4 zero-window probe.
    pub timer: u8,
    /// Socket inode; matches `socket:[INODE]` in `/proc/PID/fd/*` links.
    pub inode: u64,
}

/// Parse the text of `/proc/net/tcp` or `/proc/net/tcp6` (same columns, longer addresses).
/// The header line and malformed lines are skipped.
pub fn parse_tcp_table(text: &str) -> Vec<TcpRow> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            // Columns: sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(cols.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            let state = u8::from_str_radix(cols.get(3)?, 16).ok()?;
            let (tx, rx) = cols.get(4)?.split_once(':')?;
            let tx_queue = u64::from_str_radix(tx, 16).ok()?;
            let rx_queue = u64::from_str_radix(rx, 16).ok()?;
            let timer = u8::from_str_radix(cols.get(5)?.split_once(':')?.0, 16).ok()?;
            let inode = cols.get(9)?.parse().ok()?;
            Some(TcpRow {
                state,
                local_port,
                tx_queue,
                rx_queue,
                timer,
                inode,
            })
        })
        .collect()
}

/// Socket inodes held by `pid`, from the `socket:[INODE]` targets of `/proc/PID/fd/*`.
pub fn socket_inodes(pid: u32) -> io::Result<HashSet<u64>> {
    let mut inodes = HashSet::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        // An fd can close between readdir and readlink; that is not an error here.
        let Ok(target) = fs::read_link(entry?.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
        {
            if let Ok(inode) = inode.parse() {
                inodes.insert(inode);
            }
        }
    }
    Ok(inodes)
}

/// Number of open file descriptors of `pid` (what `ls /proc/PID/fd | wc -l` counts).
pub fn open_fds(pid: u32) -> io::Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The rows of `pid`'s own TCP sockets (IPv4 and IPv6), from the tables of its network
/// namespace.
pub fn tcp_rows(pid: u32) -> io::Result<Vec<TcpRow>> {
    let inodes = socket_inodes(pid)?;
    let mut rows = Vec::new();
    for table in ["tcp", "tcp6"] {
        // tcp6 is absent when IPv6 is disabled: that table then holds nothing of ours.
        let text = match fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        rows.extend(
            parse_tcp_table(&text)
                .into_iter()
                .filter(|row| inodes.contains(&row.inode)),
        );
    }
    Ok(first_row_per_socket(rows))
}

/// Keep one row per socket (inode). The kernel prints `/proc/net/tcp` a page at a time and
/// resumes each page by position within a hash bucket, so while sockets open and close (any
/// busy host) a row can be printed more than once: during `loadtest compare` most reads
/// held duplicates, one CLOSE_WAIT socket eight times. Without this a count could exceed
/// the process's fds.
fn first_row_per_socket(rows: Vec<TcpRow>) -> Vec<TcpRow> {
    let mut seen = HashSet::new();
    rows.into_iter()
        .filter(|row| seen.insert(row.inode))
        .collect()
}

/// Count of `pid`'s TCP sockets in each state, as `(state, count)` pairs.
pub fn tcp_states(pid: u32) -> io::Result<Vec<(u8, usize)>> {
    let mut counts = [0usize; 256];
    for row in tcp_rows(pid)? {
        counts[row.state as usize] += 1;
    }
    Ok((0u8..=255).zip(counts).filter(|&(_, n)| n > 0).collect())
}

/// The `Max open files` line of `/proc/PID/limits`: `(soft, hard)`, `None` for unlimited.
pub fn parse_nofile_limit(limits: &str) -> Option<(Option<u64>, Option<u64>)> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut values = line["Max open files".len()..]
        .split_whitespace()
        .map(|v| match v {
            "unlimited" => Some(None),
            v => v.parse().ok().map(Some),
        });
    Some((values.next()??, values.next()??))
}

/// `pid`'s RLIMIT_NOFILE as `(soft, hard)` (what `prlimit --pid PID --nofile` shows).
pub fn nofile_limit(pid: u32) -> io::Result<(Option<u64>, Option<u64>)> {
    let text = fs::read_to_string(format!("/proc/{pid}/limits"))?;
    parse_nofile_limit(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no 'Max open files' line"))
}

/// Number of `pid`'s sockets in CLOSE_WAIT: peers that closed and that `pid` never closed.
pub fn close_wait_sockets(pid: u32) -> io::Result<usize> {
    Ok(tcp_states(pid)?
        .into_iter()
        .find(|&(state, _)| state == TCP_CLOSE_WAIT)
        .map_or(0, |(_, n)| n))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded on Linux 6.x: a listener, an established pair and a CLOSE_WAIT socket.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1EC6 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41817 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1EC6 0100007F:D3F2 08 00000000:00000001 00:00000000 00000000     0        0 41820 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:D3F4 0100007F:1EC6 01 0000002A:00000000 02:00000F9C 00000000     0        0 41822 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1EC6 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 52001 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:1EC6 00000000000000000000000001000000:A1B2 08 00000000:00000001 00:00000000 00000000     0        0 52007 1 0000000000000000 20 4 30 10 -1
";

    fn row(state: u8, tx_queue: u64, rx_queue: u64, timer: u8, inode: u64) -> TcpRow {
        TcpRow {
            state,
            local_port: 0,
            tx_queue,
            rx_queue,
            timer,
            inode,
        }
    }

    #[test]
    fn parses_ipv4_rows_with_state_queues_and_inode() {
        let rows = parse_tcp_table(TCP);
        assert_eq!(
            rows.iter().map(|r| r.local_port).collect::<Vec<_>>(),
            [0x1EC6, 0x1EC6, 0xD3F4]
        );
        let rows: Vec<TcpRow> = rows
            .into_iter()
            .map(|r| TcpRow { local_port: 0, ..r })
            .collect();
        assert_eq!(
            rows,
            vec![
                row(TCP_LISTEN, 0, 0, 0, 41817),
                row(TCP_CLOSE_WAIT, 0, 1, 0, 41820),
                row(TCP_ESTABLISHED, 0x2a, 0, TIMER_KEEPALIVE, 41822)
            ]
        );
    }

    #[test]
    fn parses_ipv6_rows_with_long_addresses() {
        let rows: Vec<TcpRow> = parse_tcp_table(TCP6)
            .into_iter()
            .map(|r| TcpRow { local_port: 0, ..r })
            .collect();
        assert_eq!(
            rows,
            vec![
                row(TCP_LISTEN, 0, 0, 0, 52001),
                row(TCP_CLOSE_WAIT, 0, 1, 0, 52007)
            ]
        );
    }

    #[test]
    fn parses_the_nofile_line_of_proc_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            1024                 524288               files
Max locked memory         8388608              8388608              bytes
";
        assert_eq!(parse_nofile_limit(limits), Some((Some(1024), Some(524288))));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_nofile_limit(unlimited), Some((None, None)));
        assert_eq!(parse_nofile_limit("Max processes 1 1 processes\n"), None);
    }

    #[test]
    fn a_socket_printed_twice_while_the_table_changed_counts_once() {
        // Recorded during `loadtest compare`: the same CLOSE_WAIT socket (inode 9213969) at
        // two places of one read of /proc/net/tcp.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
4816: 0100007F:A9A3 0100007F:DC36 08 00000000:00000000 00:00000000 00000000     0        0 9213969 1 0000000080f6499f 20 4 30 18 -1
4817: 0100007F:A9A3 0100007F:DC38 08 00000000:00000000 00:00000000 00000000     0        0 9213970 1 0000000080f6499f 20 4 30 18 -1
4823: 0100007F:A9A3 0100007F:DC36 08 00000000:00000000 00:00000000 00000000     0        0 9213969 1 0000000080f6499f 20 4 30 18 -1
";
        let rows = first_row_per_socket(parse_tcp_table(table));
        assert_eq!(
            rows.iter().map(|r| r.inode).collect::<Vec<_>>(),
            vec![9213969, 9213970]
        );
    }

    #[test]
    fn skips_header_and_malformed_lines() {
        assert!(parse_tcp_table("header only\n").is_empty());
        assert!(parse_tcp_table("h\n   0: garbage\n").is_empty());
    }

    #[test]
    fn counts_own_open_fds() {
        // Other tests of this binary open and close sockets on other threads, so a single
        // before/after pair can be off; one file more must still show as exactly +1 in
        // some attempt (a miscount would show in none).
        let pid = std::process::id();
        let exact = (0..100).any(|_| {
            let before = open_fds(pid).unwrap();
            let file = std::fs::File::open("/proc/self/stat").unwrap();
            let with = open_fds(pid).unwrap();
            drop(file);
            let after = open_fds(pid).unwrap();
            with == before + 1 && after == before
        });
        assert!(
            exact,
            "one more open file never counted as exactly one more fd"
        );
    }
}
