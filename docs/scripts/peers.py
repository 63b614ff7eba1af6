"""Open N connections to a closewait server one after another; each sends PING, reads the
PONG and closes (sends FIN). Against a correct server nothing is left behind; against
`closewait --leaky` each one leaves a socket in CLOSE_WAIT.

Usage: python3 docs/scripts/peers.py PORT [N]    (N defaults to 5; loopback only)"""
import socket
import struct
import sys

port = int(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 5
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(struct.pack(">I", 1) + b"\x02")      # PING
    assert s.recv(5) == b"\x00\x00\x00\x01\x82"     # PONG
    s.close()                                       # FIN: the server should close too
print(f"{n} peers connected, pinged and closed")
