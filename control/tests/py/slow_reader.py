"""A reader that starts late and a writer that sends more than the path
holds, blocking (the writer's sendall must wait for room, never fail).

    slow_reader.py server PORT   prints "listening", accepts one connection,
                                 waits 0.5 s, reads to the end, prints "got N"
    slow_reader.py client PORT   sends 8 MiB with a blocking sendall, closes,
                                 prints "sent N" (or the error)
"""
import socket
import sys
import time

SERVER = '198.18.0.2'
SIZE = 8 << 20


def main():
    role, port = sys.argv[1], int(sys.argv[2])
    if role == 'server':
        l = socket.socket()
        l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind(('0.0.0.0', port))
        l.listen(1)
        l.settimeout(30)
        print('listening', flush=True)
        c, _ = l.accept()
        c.settimeout(30)
        time.sleep(0.5)
        n = 0
        while True:
            b = c.recv(1 << 16)
            if not b:
                break
            n += len(b)
        print('got', n, flush=True)
        return
    c = socket.create_connection((SERVER, port), timeout=10)
    c.settimeout(None)  # blocking, as most programs use sockets
    try:
        c.sendall(b'x' * SIZE)
        print('sent', SIZE, flush=True)
    except OSError as e:
        print('error', e.errno, flush=True)
    c.close()


main()
