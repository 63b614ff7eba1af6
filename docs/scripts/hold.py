"""Legitimate load, for comparison with a leak: open 25 persistent connections a second for
3 seconds, PING every one of them once a second, and close them all after 7 seconds.

Usage: python3 docs/scripts/hold.py PORT    (loopback only)"""
import socket
import struct
import sys
import time

port = int(sys.argv[1])
conns = []
for second in range(7):
    if second < 3:
        conns += [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(25)]
    for s in conns:
        s.sendall(struct.pack(">I", 1) + b"\x02")   # PING
        assert s.recv(5) == b"\x00\x00\x00\x01\x82"  # PONG
    time.sleep(1)
print(f"held {len(conns)} connections for 7 s, closing them")
