"""Show the RST rule: closing a socket with unread input resets the connection and destroys
replies in flight. Start the server, then run `python3 docs/scripts/rst-on-close.py PORT
[TRIALS]`. Each trial is issue 10's case: one write of an ECHO frame with 200,000 B, the
header FF FF FF FF (an invalid length), then 200,000 more bytes; then read to the end. It
prints how many trials got every reply byte, the ERROR frame and EOF, how many ended in
ECONNRESET, and how much the kernel's own counts of such aborts rose meanwhile
(/proc/net/netstat, for the whole network namespace): TcpExtTCPAbortOnClose, a socket
closed with unread input, and TcpExtTCPAbortOnData, input arriving for a socket already
closed (or a close with SO_LINGER 0)."""
import socket
import struct
import sys
import threading

port = int(sys.argv[1])
trials = int(sys.argv[2]) if len(sys.argv) > 2 else 100


def aborts():
    """The kernel's reset counters (tcp_close() and tcp_rcv_state_process() in
    net/ipv4/tcp.c and tcp_input.c)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return {k: int(table[k]) for k in ("TCPAbortOnClose", "TCPAbortOnData")}
    raise SystemExit("no TcpExt line in /proc/net/netstat")


data = b"\x5a" * 200_000
request = struct.pack(">I", 1 + len(data)) + b"\x01" + data + b"\xff" * 4 + b"\xa5" * 200_000
echo = struct.pack(">I", 1 + len(data)) + b"\x81" + data
before = aborts()
whole = resets = 0
short = []
for _ in range(trials):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    # Another thread writes: the server stops reading at the bad length.
    writer = threading.Thread(target=lambda: s.sendall(request), daemon=True)
    writer.start()
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except ConnectionResetError:
        resets += 1
        short.append(len(got))
    else:
        if got.startswith(echo) and got[len(echo) + 4:len(echo) + 5] == b"\xff":
            whole += 1
    writer.join(10)
    s.close()
print(f"{trials} trials: {whole} got the whole echo reply, the ERROR frame and EOF; "
      f"{resets} ended in ECONNRESET"
      + (f" after {min(short)}-{max(short)} bytes (the echo reply is {len(echo)})"
         if short else ""))
after = aborts()
print(", ".join(f"TcpExt{k} +{after[k] - before[k]}" for k in after))
