"""A fork-per-connection server (socketserver.ForkingTCPServer: the parent
closes its copy at once, a child serves the connection and exits) and a
client that checks every answer.

    fork_server.py server PORT      prints "listening", serves until killed
    fork_server.py client PORT N    N connections one after the other, each
                                    with its own payload; prints "ok K of N"
"""
import os
import socket
import socketserver
import sys

SERVER = '198.18.0.2'


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        data = b''
        while not data.endswith(b'\n'):
            b = self.request.recv(4096)
            if not b:
                break
            data += b
        self.request.sendall(b'pid %d: ' % os.getpid() + data)


class Server(socketserver.ForkingTCPServer):
    allow_reuse_address = True


def client(port, n):
    """N connections one after the other, each with its own payload, every
    answer checked; prints "ok K of N, P server processes"."""
    ok, pids = 0, set()
    for i in range(n):
        c = socket.create_connection((SERVER, port), timeout=10)
        want = b'connection %d of %d\n' % (i, n)
        c.sendall(want)
        got = b''
        while True:
            b = c.recv(4096)
            if not b:
                break
            got += b
        c.close()
        if got.endswith(b': ' + want):
            ok += 1
            pids.add(got.split(b':')[0])
        else:
            print('connection', i, 'got', got, flush=True)
    print('ok %d of %d, %d server processes' % (ok, n, len(pids)), flush=True)


def main():
    role, port = sys.argv[1], int(sys.argv[2])
    if role == 'server':
        s = Server(('0.0.0.0', port), Echo)
        print('listening', flush=True)
        s.serve_forever()
        return
    client(port, int(sys.argv[3]))


if __name__ == '__main__':
    main()
