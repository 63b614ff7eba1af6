"""The server of leaky_server.py, fixed: every way out of a connection closes it.

Protocol: each request is a line holding a number N; the reply is N bytes of "x" and a newline
(a tiny download server). "QUIT" ends the session.

The fixes, the first list of the incident:
- `with conn:` closes the socket however the handler ends: return, reset, broken pipe, bad input;
- recv returning b"" (the peer's FIN) is the ordinary end of the connection, not an error;
- `finally` forgets the connection in the registry on every path;
- a silent peer is dropped after IDLE_TIMEOUT, and a line is bounded;
- the fd limit is raised soft -> hard at start-up with resource.setrlimit, and accept
  survives EMFILE by backing off instead of dying.

Usage: python3 fixed_server.py [PORT]    (default 7878, 0 picks one; loopback only)"""
import errno
import logging
import resource
import socket
import sys
import threading
import time

MAX_REPLY = 16 << 20            # bytes: the largest reply a request may ask for
MAX_LINE = 64                   # bytes: a request line longer than this is bad input
IDLE_TIMEOUT = 300              # seconds without a request before a connection is dropped
ACCEPT_BACKOFF = 0.1            # seconds to wait after EMFILE before accepting again
clients = {}                    # peer address -> socket: every open connection


def handle(conn, peer):
    with conn:                                      # closes on every way out of this block
        clients[peer] = conn
        try:
            conn.settimeout(IDLE_TIMEOUT)
            buf = b""
            while True:
                chunk = conn.recv(4096)
                if not chunk:                       # b"": the peer sent FIN; nothing more comes
                    return
                buf += chunk
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    if line.strip() == b"QUIT":
                        return
                    conn.sendall(b"x" * min(int(line), MAX_REPLY) + b"\n")
                if len(buf) > MAX_LINE:
                    raise ValueError(f"request line longer than {MAX_LINE} bytes")
        except (OSError, ValueError) as e:          # reset, broken pipe, timeout, bad input
            logging.warning("%s: %s", peer, e)
        finally:
            del clients[peer]


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.info("fd limit: soft %d (was %d), hard %d", hard, soft, hard)


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")   # stderr; thread-safe
    raise_fd_limit()
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 7878
    with socket.create_server(("127.0.0.1", port)) as listener:
        print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
        while True:
            try:
                conn, peer = listener.accept()
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                # Out of fds: the connection waits in the backlog until one closes. Without
                # the pause this loop would spin, failing accept as fast as the CPU allows.
                logging.warning("accept: %s; retrying in %s s", e, ACCEPT_BACKOFF)
                time.sleep(ACCEPT_BACKOFF)
                continue
            threading.Thread(target=handle, args=(conn, peer), daemon=True).start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
