"""A plain kernel TCP service that starts listening just before each connect.

    listen_race.py server BASE N   for each of N rounds: listens on port
                                   BASE+i, prints "listening PORT", accepts
                                   one connection (10 s at most), closes, and
                                   waits for a line on stdin before the next
    listen_race.py client          for each port read on stdin: connects to
                                   198.18.0.2:PORT (10 s at most), prints
                                   "ok PORT" or "error PORT ERRNO", closes
"""
import socket, sys
if sys.argv[1] == 'server':
    base, n = int(sys.argv[2]), int(sys.argv[3])
    for i in range(n):
        l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind(('0.0.0.0', base + i)); l.listen(8); l.settimeout(10)
        print('listening', base + i, flush=True)
        try:
            c, _ = l.accept(); c.close()
        except OSError:
            pass
        l.close()
        if not sys.stdin.readline():
            break
else:
    for line in sys.stdin:
        port = int(line)
        s = socket.socket(); s.settimeout(10)
        try:
            s.connect(('198.18.0.2', port))
            print('ok', port, flush=True)
        except OSError as e:
            print('error', port, e.errno, flush=True)
        s.close()
