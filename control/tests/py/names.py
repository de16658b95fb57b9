"""Socket names, as a program sees them (getsockname, getpeername, accept).

    names.py server PORT   prints "listening", accepts one connection,
                           prints "server sock ADDR peer ADDR accept-addr ADDR"
    names.py client PORT   connects to 198.18.0.2:PORT, prints
                           "client sock ADDR peer ADDR"
"""
import socket, sys
if sys.argv[1] == 'server':
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(('0.0.0.0', int(sys.argv[2]))); l.listen()
    print('listening', flush=True)
    c, a = l.accept()
    print('server sock', c.getsockname(), 'peer', c.getpeername(), 'accept-addr', a, flush=True)
    c.recv(10)
else:
    s = socket.create_connection(('198.18.0.2', int(sys.argv[2])), timeout=5)
    print('client sock', s.getsockname(), 'peer', s.getpeername(), flush=True)
    s.sendall(b'x'); s.close()
