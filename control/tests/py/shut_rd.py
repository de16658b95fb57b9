"""SHUT_RD on a connection with bytes already received.

    shut_rd.py server PORT   accepts one connection, sends b"abc", waits for
                             the peer to close
    shut_rd.py client PORT   connects to 198.18.0.2:PORT, waits until the
                             bytes are there (poll), shuts down reading, then
                             prints what two receives give
"""
import select
import socket
import sys

if sys.argv[1] == "server":
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", int(sys.argv[2])))
    l.listen()
    print("listening", flush=True)
    c, _ = l.accept()
    c.sendall(b"abc")
    c.settimeout(10)
    try:
        c.recv(10)
    except OSError:
        pass
else:
    s = socket.create_connection(("198.18.0.2", int(sys.argv[2])), timeout=10)
    p = select.poll()
    p.register(s, select.POLLIN)
    assert p.poll(10000), "no bytes came"
    s.shutdown(socket.SHUT_RD)
    print("after SHUT_RD:", s.recv(10), s.recv(10), flush=True)
    s.close()
