"""What a scrape of closewait's --metrics costs on a host full of TIME_WAIT sockets, next to
reading /proc/net/tcp (what counting CLOSE_WAIT costs without netlink's state filter).

Fills loopback with TIME_WAIT sockets first (they expire after 60 s), then times 20 scrapes
and 20 reads of /proc/net/tcp and /proc/net/tcp6, and prints the medians.

Usage: python3 docs/scripts/scrape-cost.py METRICS_PORT [ROUNDS]   (loopback only;
ROUNDS of 30,000 short connections each, default 3)"""
import socket
import sys
import time

port = int(sys.argv[1])
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1024)
for _ in range(rounds):
    for _ in range(30000):
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        client.close()  # the side that closes first holds TIME_WAIT
        server.close()


def count_time_wait():
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            n += sum(1 for line in f if line.split()[3] == "06")
    return n


def scrape():
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    while s.recv(65536):
        pass
    s.close()


def read_proc_net_tcp():
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            f.read()


def median_ms(f):
    times = []
    for _ in range(20):
        start = time.perf_counter()
        f()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[10]


print(f"{count_time_wait()} TIME_WAIT sockets on the host")
print(f"one scrape: {median_ms(scrape):.1f} ms (median of 20)")
print(f"one read of /proc/net/tcp and tcp6: {median_ms(read_proc_net_tcp):.1f} ms (median of 20)")
