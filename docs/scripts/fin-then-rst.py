"""Open N connections to a closewait server; each sends PING, reads the PONG, half-closes
(FIN) and then, once the server has read the FIN, resets (close with SO_LINGER 0: RST).
Against `closewait --leaky` each one leaves a socket that went from CLOSE_WAIT to CLOSE: out
of every TCP table, fd still open. A keepalive probe to a vanished peer does the same to a
leaked socket, minutes later.

Usage: python3 docs/scripts/fin-then-rst.py PORT [N]    (N defaults to 5; loopback only)"""
import socket
import struct
import sys
import time

port = int(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 5
LINGER_0 = struct.pack("ii", 1, 0)


def request(s, op):
    s.sendall(struct.pack(">I", 1) + op)
    length, = struct.unpack(">I", s.recv(4))
    reply = b""
    while len(reply) < length:
        reply += s.recv(length - len(reply))
    return reply


def leaked(s):
    """The server's `leaked` counter: peer FINs it read and ignored."""
    stats = dict(line.split() for line in request(s, b"\x03")[1:].decode().splitlines())
    return int(stats["leaked"])


stats = socket.create_connection(("127.0.0.1", port), timeout=5)
before = leaked(stats)
peers = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert request(s, b"\x02") == b"\x82"           # PING -> PONG
    s.shutdown(socket.SHUT_WR)                      # FIN: the server's socket enters CLOSE_WAIT
    peers.append(s)
# Reset only once the server has read every FIN: reset before, and it reads an error instead.
deadline = time.monotonic() + 5
while leaked(stats) < before + n:
    assert time.monotonic() < deadline, "the server did not read the FINs (is it --leaky?)"
for s in peers + [stats]:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
    s.close()                                       # RST: CLOSE_WAIT -> CLOSE
print(f"{n} peers sent FIN, then RST")
