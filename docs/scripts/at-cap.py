"""Show backpressure at the connection cap. Start the server with a small cap, e.g.
`closewait --listen 127.0.0.1:0 --max-connections 2 --backlog 16`, then run
`python3 docs/scripts/at-cap.py PORT`. Five clients each send PING; those over the cap get
no PONG (they wait in the listen backlog). The listener's queue is shown with `ss`, the
first client closes, and the waiting ones are asked again: one of them is now served.
Finally some STATS counters are printed."""
import socket
import struct
import subprocess
import sys
import time

port = int(sys.argv[1])


def ask(s, op):
    """Send a one-byte request; the reply body, or None if none came within 0.5 s."""
    s.sendall(struct.pack(">I", 1) + bytes([op]))
    s.settimeout(0.5)
    try:
        n, = struct.unpack(">I", s.recv(4))
        return s.recv(n)
    except socket.timeout:
        return None


clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
print(["served" if ask(c, 0x02) else "waiting" for c in clients])
print(subprocess.run(["ss", "-tln", f"( sport = :{port} )"],
                     capture_output=True, text=True).stdout, end="")
clients[0].close()                       # a slot frees: one waiting client is served
time.sleep(0.2)
print(["served" if ask(c, 0x02) else "waiting" for c in clients[2:]])
stats = ask(clients[1], 0x03)[1:].decode()
wanted = ("active", "accepted", "accept_pauses", "accept_paused_ms", "max_connections")
print(" ".join(line for line in stats.splitlines() if line.split()[0] in wanted))
