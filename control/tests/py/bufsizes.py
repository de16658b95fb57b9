"""SO_RCVBUF / SO_SNDBUF set before listen and before connect.

    bufsizes.py server PORT RCVBUF   listens (SO_RCVBUF set first unless
                                     RCVBUF is 0), accepts one connection,
                                     prints its TCP_INFO receive space and
                                     SO_RCVBUF, waits for the peer to close
    bufsizes.py client PORT RCVBUF   connects to 198.18.0.2:PORT (SO_RCVBUF
                                     set first unless RCVBUF is 0) and
                                     prints the same
"""
import socket
import struct
import sys

# struct tcp_info: 8 bytes of u8 fields, then u32 fields; tcpi_rcv_space is
# the 23rd of those.
RCV_SPACE = 8 + 4 * 22


def report(who, s):
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    space = struct.unpack_from("I", info, RCV_SPACE)[0]
    rcvbuf = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    print(f"{who} rcv_space {space} so_rcvbuf {rcvbuf}", flush=True)


role, port, rcvbuf = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if role == "server":
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf:
        l.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    l.bind(("0.0.0.0", port))
    l.listen()
    print("listening", flush=True)
    c, _ = l.accept()
    report("server", c)
    c.settimeout(10)
    try:
        c.recv(10)
    except OSError:
        pass
else:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect(("198.18.0.2", port))
    report("client", s)
    s.close()
