"""Forks while other threads are inside the socket layer.

    fork_churn.py server PORT
        accepts and closes connections for ever (prints "listening").
    fork_churn.py client IP PORT FORKS
        four threads connect and close one connection after another while the
        main thread forks FORKS times; each child makes a socket, polls and
        closes it, then exits. A child that has not exited within 5 s is
        counted as hung (and killed). Prints "forks N hung H conns C".
"""
import os
import select
import socket
import sys
import threading
import time


def serve(port):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(128)
    print("listening", flush=True)
    while True:
        r, _, _ = select.select([ls], [], [], 30)
        if not r:
            return
        try:
            c, _ = ls.accept()
        except BlockingIOError:
            continue
        c.close()


def client(host, port, forks):
    stop = threading.Event()
    conns = [0]

    def churn():
        while not stop.is_set():
            try:
                s = socket.create_connection((host, port), timeout=2)
                s.close()
                conns[0] += 1
            except OSError:
                pass

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    hung = 0
    for _ in range(forks):
        pid = os.fork()
        if pid == 0:
            try:
                s = socket.socket()
                select.select([s], [s], [], 0)
                s.close()
            finally:
                os._exit(0)
        deadline = time.monotonic() + 5
        while True:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                hung += 1
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                break
            time.sleep(0.001)
    stop.set()
    for t in threads:
        t.join()
    print(f"forks {forks} hung {hung} conns {conns[0]}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]))
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
