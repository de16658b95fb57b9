"""Many SAN connections open at once, each with its readiness registered.

    hold_many.py server PORT N
        accepts N connections (epoll), echoes what each sends, prints "held N"
        once all N are open and answered, then "fds D" (its open
        descriptors), then holds them until stdin closes.
    hold_many.py client IP PORT N
        opens N connections, then sends 4 bytes on each and reads them back
        (epoll): prints "ok N fds D" when every one answered (D: its open
        descriptors then, the connections among them).
"""
import os
import selectors
import socket
import sys


def fds():
    return len(os.listdir("/proc/self/fd"))


def serve(port, n):
    sel = selectors.DefaultSelector()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(1024)
    ls.setblocking(False)
    sel.register(ls, selectors.EVENT_READ)
    print("listening", flush=True)
    conns, answered = [], 0
    while answered < n:
        for key, _ in sel.select(timeout=60):
            if key.fileobj is ls:
                try:
                    c, _ = ls.accept()
                except BlockingIOError:
                    continue
                c.setblocking(False)
                conns.append(c)
                sel.register(c, selectors.EVENT_READ)
            else:
                try:
                    d = key.fileobj.recv(16)
                except BlockingIOError:
                    continue
                if d:
                    key.fileobj.sendall(d)
                    answered += 1
    print(f"held {len(conns)}", flush=True)
    print(f"fds {fds()}", flush=True)
    sys.stdin.read()


def client(host, port, n):
    socks = [socket.create_connection((host, port), timeout=10) for _ in range(n)]
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        s.sendall(b"%04d" % i)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    got = 0
    while got < n:
        ev = sel.select(timeout=30)
        if not ev:
            break
        for key, _ in ev:
            try:
                d = key.fileobj.recv(16)
            except BlockingIOError:
                continue
            assert d == b"%04d" % key.data, (d, key.data)
            sel.unregister(key.fileobj)
            got += 1
    print(f"ok {got} fds {fds()}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]), int(sys.argv[3]))
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
