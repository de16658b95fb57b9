"""A master that accepts connections and passes each one, with SCM_RIGHTS
over a Unix socket, to one of two worker processes (started afresh, not
forked), closing its own copy at once; the workers answer. And a client
that checks every answer.

    pass_server.py server PORT DIR  prints "listening", serves until killed
    pass_server.py client PORT N    N connections one after the other, each
                                    with its own payload; prints "ok K of N,
                                    P server processes"
"""
import os
import socket
import subprocess
import sys

from fork_server import client  # the same client and its check

WORKERS = 2


def worker(path):
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    u.connect(path)
    while True:
        _, fds, _, _ = socket.recv_fds(u, 1, 1)
        if not fds:
            return
        c = socket.socket(fileno=fds[0])
        data = b''
        while not data.endswith(b'\n'):
            b = c.recv(4096)
            if not b:
                break
            data += b
        c.sendall(b'worker %d: ' % os.getpid() + data)
        c.close()


def server(port, d):
    path = os.path.join(d, 'workers.sock')
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    u.bind(path)
    u.listen(WORKERS)
    procs = [subprocess.Popen([sys.executable, __file__, 'worker', path])
             for _ in range(WORKERS)]
    workers = [u.accept()[0] for _ in procs]
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('0.0.0.0', port))
    s.listen(64)
    print('listening', flush=True)
    i = 0
    try:
        while True:
            c, _ = s.accept()
            socket.send_fds(workers[i % WORKERS], [b'c'], [c.fileno()])
            c.close()
            i += 1
    finally:
        for p in procs:
            p.kill()


def main():
    role = sys.argv[1]
    if role == 'worker':
        worker(sys.argv[2])
    elif role == 'server':
        server(int(sys.argv[2]), sys.argv[3])
    else:
        client(int(sys.argv[2]), int(sys.argv[3]))


main()
