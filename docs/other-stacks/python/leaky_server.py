"""A small threaded line server with the incident's bug. Do not copy it: see fixed_server.py.

Protocol: each request is a line holding a number N; the reply is N bytes of "x" and a newline
(a tiny download server). "QUIT" ends the session.

The bug is the one `loadtest probe` finds in many real servers: the happy path closes, the
exception path does not. A peer that simply goes away (FIN, or a reset while we were still
replying) ends up in `except`, which logs and returns; the socket is still referenced from
`clients`, so nothing closes it: after a FIN it sits in CLOSE_WAIT holding an fd, after a
reset it leaves the TCP tables but holds the fd all the same, until accept fails with
"Too many open files".

Usage: python3 leaky_server.py [PORT]    (default 7878, 0 picks one; loopback only)"""
import logging
import socket
import sys
import threading

MAX_REPLY = 16 << 20            # bytes: the largest reply a request may ask for
clients = {}                    # peer address -> socket: every open connection


def read_line(conn, buf):
    """Return (line, rest). Like the recv loop of Python's socket HOWTO, it raises when
    recv returns b"": here the peer's FIN arrives as an exception."""
    while b"\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("socket connection broken")
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    return line, rest


def handle(conn, peer):
    clients[peer] = conn
    buf = b""
    try:
        while True:
            line, buf = read_line(conn, buf)
            if line.strip() == b"QUIT":
                break
            conn.sendall(b"x" * min(int(line), MAX_REPLY) + b"\n")
    except (OSError, ValueError) as e:
        logging.warning("%s: %s", peer, e)
        return      # BUG: conn is never closed (and stays in clients): one fd per peer, forever
    del clients[peer]
    conn.close()


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")   # stderr; thread-safe
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 7878
    listener = socket.create_server(("127.0.0.1", port))
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
    while True:
        conn, peer = listener.accept()      # at the fd limit: OSError EMFILE, and the server dies
        threading.Thread(target=handle, args=(conn, peer), daemon=True).start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
