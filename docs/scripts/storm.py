"""A repeatable close storm, for profiling a server while it closes many connections at once.
Holds 10,000 connections to 127.0.0.1:PORT; then, ROUNDS times, half-closes 1,000 of them at
once (shutdown(SHUT_WR): to the server, exactly a peer's FIN) and waits until the server's
FIN came back on every one, printing both durations and the CLOCK_MONOTONIC window (for
`perf report --time`); the 1,000 are then replaced by new connections.

Usage: python3 docs/scripts/storm.py PORT [ROUNDS]    (ROUNDS defaults to 5; loopback only)
Needs a hard RLIMIT_NOFILE above 10,000 for this client and a server allowed as many."""
import os
import resource
import select
import socket
import sys
import time

HELD, CLOSED = 10_000, 1_000
port = int(sys.argv[1])
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks = []


def top_up():
    while len(socks) < HELD:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setblocking(False)
        socks.append(s)


top_up()
time.sleep(0.5)
for r in range(rounds):
    victims, socks[:CLOSED] = socks[:CLOSED], []
    ep = select.epoll()
    for s in victims:
        ep.register(s.fileno(), select.EPOLLIN)
    time.sleep(0.2)
    t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
    for s in victims:
        s.shutdown(socket.SHUT_WR)
    t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
    left = {s.fileno() for s in victims}
    while left:
        ready = ep.poll(5)
        if not ready:
            sys.exit(f"round {r}: {len(left)} connections not closed by the server within 5 s")
        for fd, _ in ready:
            try:
                if fd in left and os.read(fd, 64) == b"":
                    left.discard(fd)
            except BlockingIOError:
                pass
            except OSError:  # a reset also means the server's socket is gone
                left.discard(fd)
    t2 = time.clock_gettime(time.CLOCK_MONOTONIC)
    print(f"round {r}: window {t0:.6f},{t2:.6f}  1,000 FINs sent in {1e3 * (t1 - t0):.1f} ms, "
          f"last server FIN back {1e3 * (t2 - t1):.1f} ms after the last one", flush=True)
    for s in victims:
        s.close()
    ep.close()
    top_up()
    time.sleep(0.3)
