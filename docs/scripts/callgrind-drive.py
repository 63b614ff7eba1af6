"""Drive a closewait server for docs/scripts/callgrind-per-request.sh: PORT N MODE, MODE ping
(N requests, one at a time) or pipe (N ECHO of 64 B, 16 per write)."""
import socket, struct, sys
port, n, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
ping = struct.pack(">I", 1) + b"\x02"
echo = struct.pack(">I", 65) + b"\x01" + b"x" * 64
def readn(k):
    b = b""
    while len(b) < k:
        c = s.recv(k - len(b)); assert c; b += c
    return b
if mode == "ping":
    for _ in range(n):
        s.sendall(ping); readn(5)
else:
    batch = echo * 16
    for _ in range(n // 16):
        s.sendall(batch); readn(69 * 16)
s.close()
