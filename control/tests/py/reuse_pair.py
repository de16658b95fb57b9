"""A fresh connection after a closed one must read nothing of it.

    reuse_pair.py server PORT ROUNDS
        per round: accept A, read it to the end, reply b"Y%04d", close; accept
        B and close it with SO_LINGER {1, 0} (a reset) without sending.
    reuse_pair.py client IP PORT ROUNDS
        per round: connect A, send one byte, SHUT_WR, read the reply to the
        end, close A; connect B at once and read it: the end of the stream or
        ECONNRESET (also as the connect's outcome, when the reset lands before
        the connect's result is read, as on kernel TCP), never a byte, within
        5 s. Prints "rounds N foreign F hung H eof E reset R badreply X".

Run unmodified on kernel TCP, and under libdsan_preload.so over the SAN.
"""
import select
import socket
import struct
import sys


def serve(port, rounds):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(16)
    print("listening", flush=True)

    def accept():
        while True:
            r, _, _ = select.select([ls], [], [], 20)
            if not r:
                raise SystemExit("server: no client for 20 s")
            try:
                return ls.accept()[0]
            except BlockingIOError:
                continue

    for i in range(rounds):
        a = accept()
        a.settimeout(10)
        while a.recv(100):
            pass
        a.sendall(b"Y%04d" % (i % 10000))
        a.close()
        b = accept()
        b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.close()
    print(f"served {rounds}", flush=True)


def client(host, port, rounds):
    foreign = hung = eof = reset = badreply = 0
    for i in range(rounds):
        a = socket.create_connection((host, port), timeout=10)
        a.sendall(b"x")
        a.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            d = a.recv(100)
            if not d:
                break
            got += d
        a.close()
        if got != b"Y%04d" % (i % 10000):
            badreply += 1
            print(f"round {i}: A got {got!r}", flush=True)
        try:
            b = socket.create_connection((host, port), timeout=5)
        except ConnectionResetError:
            reset += 1
            continue
        try:
            d = b.recv(100)
            if d:
                foreign += 1
                print(f"round {i}: A got {got!r}, fresh B got {d!r}", flush=True)
            else:
                eof += 1
        except ConnectionResetError:
            reset += 1
        except socket.timeout:
            hung += 1
            print(f"round {i}: B hung (no end of stream, no reset in 5 s)", flush=True)
        b.close()
    print(f"rounds {rounds} foreign {foreign} hung {hung} eof {eof} reset {reset} "
          f"badreply {badreply}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]), int(sys.argv[3]))
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
