"""Socket behaviours as a program observes them, for the differential suite:
run once on plain kernel TCP and once with libdsan_preload.so (over the SAN),
the observations must be the same.

    differential.py server BASE   listens on BASE+i for each behaviour i,
                                  prints "listening", serves each behaviour on
                                  its own thread, prints its observations and
                                  "server done"
    differential.py client BASE   runs each behaviour's client side against
                                  198.18.0.2:BASE+i, prints its observations
                                  and "client done"
    differential.py list          prints the behaviours, one per line

An observation is a line "NAME SIDE KEY VALUE"; ephemeral ports print as
EPH, so that the two runs compare. Every wait has a timeout.
"""
import errno
import hashlib
import os
import select
import socket
import struct
import sys
import threading
import time

SERVER = '198.18.0.2'
T = 10  # seconds: connects, polls and selects
WAIT = 120  # seconds: a listener waits this long for its behaviour's client
BEHAVIOURS = []


def behaviour(name):
    def reg(f):
        BEHAVIOURS.append((name, f))
        return f
    return reg


def err_name(e):
    return errno.errorcode.get(e.errno, str(e.errno)) if isinstance(e, OSError) and e.errno else type(e).__name__


def attempt(out, key, f):
    """Runs f, observing its result or its errno."""
    try:
        r = f()
        out(key, 'ok' if r is None else r)
        return r
    except (OSError, socket.timeout) as e:
        out(key, 'error ' + err_name(e))
        return None


def name(addr, base):
    ip, port = addr[0], addr[1]
    return f'{ip}:{"BASE+%d" % (port - base) if base <= port < base + 1000 else "EPH"}'


def connect(port):
    """A connected socket, blocking (as most programs use them)."""
    s = socket.socket()
    s.settimeout(T)
    s.connect((SERVER, port))
    s.settimeout(None)
    return s


def accept(l):
    c, _ = l.accept()
    c.settimeout(None)
    return c


def recv_all(c, n):
    b = b''
    while len(b) < n:
        x = c.recv(n - len(b))
        if not x:
            break
        b += x
    return b


def served(x, n=1):
    """The usual server side: accept, read n bytes, close."""
    c = accept(x)
    recv_all(c, n)
    c.close()


# Each behaviour: f(role, sock_or_port, out, base, sync) where role is
# 'server' (sock: its listener) or 'client' (port). sync(k) is a barrier
# point k shared by the two sides of one behaviour through the bytes they
# exchange (no other channel: the sides are in different hosts).


@behaviour('names')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        out('sock', name(c.getsockname(), base))
        out('peer_ip', c.getpeername()[0])
        c.recv(1)
        c.close()
    else:
        s = connect(x)
        out('sock_ip', s.getsockname()[0])
        out('peer', name(s.getpeername(), base))
        s.sendall(b'x')
        s.close()


@behaviour('echo-small')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        d = recv_all(c, 5)
        out('got', d.decode())
        c.sendall(d[::-1])
        c.close()
    else:
        s = connect(x)
        s.sendall(b'hello')
        out('got', recv_all(s, 5).decode())
        out('eof', s.recv(10))
        s.close()


@behaviour('peek-then-read')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        c.sendall(b'abcdef')
        c.recv(1)
        c.close()
    else:
        s = connect(x)
        time.sleep(0.05)
        out('peek', s.recv(3, socket.MSG_PEEK))
        out('read', recv_all(s, 6))
        s.sendall(b'.')
        s.close()


@behaviour('waitall')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        for part in (b'12', b'34', b'56'):
            c.sendall(part)
            time.sleep(0.02)
        c.recv(1)
        c.close()
    else:
        s = connect(x)
        out('waitall', s.recv(6, socket.MSG_WAITALL))
        s.sendall(b'.')
        s.close()


@behaviour('dontwait-empty')
def _(role, x, out, base):
    if role == 'server':
        served(x)
    else:
        s = connect(x)
        attempt(out, 'recv', lambda: s.recv(10, socket.MSG_DONTWAIT))
        s.sendall(b'.')
        s.close()


@behaviour('nonblocking-connect')
def _(role, x, out, base):
    if role == 'server':
        served(x)
    else:
        s = socket.socket()
        s.setblocking(False)
        r = s.connect_ex((SERVER, x))
        out('connect_ex', errno.errorcode.get(r, r))
        _, w, _ = select.select([], [s], [], T)
        out('writable', bool(w))
        out('so_error', s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
        s.setblocking(True)
        s.sendall(b'.')
        s.close()


@behaviour('refused')
def _(role, x, out, base):
    if role == 'server':
        pass  # nobody accepts on BASE+999
    else:
        s = socket.socket()
        s.settimeout(T)
        attempt(out, 'connect', lambda: s.connect((SERVER, base + 999)))
        s.close()


@behaviour('refused-nonblocking')
def _(role, x, out, base):
    if role == 'server':
        pass
    else:
        s = socket.socket()
        s.setblocking(False)
        r = s.connect_ex((SERVER, base + 998))
        out('connect_ex', errno.errorcode.get(r, r))
        select.select([], [s], [], T)
        out('so_error', errno.errorcode.get(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)))
        s.close()


@behaviour('half-close')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        d = recv_all(c, 100)
        out('got', d)
        c.sendall(b'reply')
        c.close()
    else:
        s = connect(x)
        s.sendall(b'request')
        s.shutdown(socket.SHUT_WR)
        out('reply', recv_all(s, 100))
        s.close()


@behaviour('peer-closes')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        c.sendall(b'last')
        c.close()
    else:
        s = connect(x)
        out('data', recv_all(s, 4))
        out('eof', s.recv(10))
        out('eof-again', s.recv(10))
        s.close()


@behaviour('linger-reset')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        c.recv(1)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        c.close()
    else:
        s = connect(x)
        s.sendall(b'.')
        attempt(out, 'recv', lambda: s.recv(10))
        s.close()


@behaviour('poll-readiness')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        c.recv(1)
        c.sendall(b'data')
        c.recv(1)
        c.close()
    else:
        s = connect(x)
        p = select.poll()
        p.register(s, select.POLLIN | select.POLLOUT)
        ev = dict(p.poll(T * 1000)).get(s.fileno(), 0)
        out('idle', ev & (select.POLLIN | select.POLLOUT))
        s.sendall(b'.')
        p.register(s, select.POLLIN)
        ev = dict(p.poll(T * 1000)).get(s.fileno(), 0)
        out('after-data', ev & select.POLLIN)
        out('data', recv_all(s, 4))
        s.sendall(b'.')
        s.close()


@behaviour('epoll-rdhup')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        c.recv(1)
        c.shutdown(socket.SHUT_WR)
        c.recv(1)
        c.close()
    else:
        s = connect(x)
        e = select.epoll()
        e.register(s, select.EPOLLIN | select.EPOLLRDHUP)
        s.sendall(b'.')
        evs = e.poll(T)
        ev = evs[0][1] if evs else 0
        out('events', ev & (select.EPOLLIN | select.EPOLLRDHUP))
        out('eof', s.recv(10))
        s.sendall(b'.')
        e.close()
        s.close()


@behaviour('epoll-edge')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        c.sendall(b'one')
        c.recv(1)
        c.sendall(b'two')
        c.recv(1)
        c.close()
    else:
        s = connect(x)
        s.setblocking(False)
        e = select.epoll()
        e.register(s, select.EPOLLIN | select.EPOLLET)
        out('first', len(e.poll(T)))
        # Not read: an edge-triggered wait reports nothing new.
        out('again', len(e.poll(0.2)))
        out('data', s.recv(10))
        s.setblocking(True)
        s.sendall(b'.')
        s.setblocking(False)
        out('second', len(e.poll(T)))
        out('data2', s.recv(10))
        s.setblocking(True)
        s.sendall(b'.')
        e.close()
        s.close()


@behaviour('listener-readable')
def _(role, x, out, base):
    if role == 'server':
        r, _, _ = select.select([x], [], [], T)
        out('readable', bool(r))
        c = accept(x)
        c.recv(1)
        c.close()
    else:
        s = connect(x)
        s.sendall(b'.')
        s.close()


@behaviour('accept-nonblocking-empty')
def _(role, x, out, base):
    if role == 'server':
        x.setblocking(False)
        attempt(out, 'accept', lambda: x.accept() and 'accepted')
        x.settimeout(WAIT)
        c = accept(x)
        c.recv(1)
        c.close()
    else:
        time.sleep(0.2)
        s = connect(x)
        s.sendall(b'.')
        s.close()


@behaviour('sockopts')
def _(role, x, out, base):
    if role == 'server':
        out('listener_acceptconn', x.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        c = accept(x)
        out('conn_acceptconn', c.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        c.recv(1)
        c.close()
    else:
        s = connect(x)
        out('type', s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE))
        out('so_error', s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out('nodelay', s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        out('keepalive', s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0)
        s.sendall(b'.')
        s.close()


@behaviour('fionread')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        c.sendall(b'12345678')
        c.recv(1)
        c.close()
    else:
        import fcntl
        import termios
        s = connect(x)
        select.select([s], [], [], T)
        time.sleep(0.05)
        n = struct.unpack('i', fcntl.ioctl(s.fileno(), termios.FIONREAD, b'\0\0\0\0'))[0]
        out('fionread', n)
        recv_all(s, 8)
        s.sendall(b'.')
        s.close()


@behaviour('bulk-1mib')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        d = recv_all(c, 1 << 20)
        out('sha', hashlib.sha256(d).hexdigest()[:16])
        c.sendall(hashlib.sha256(d).digest())
        c.close()
    else:
        s = connect(x)
        d = os.urandom(0) + bytes(range(256)) * 4096
        s.sendall(d)
        out('echoed_sha_ok', recv_all(s, 32) == hashlib.sha256(d).digest())
        s.close()


@behaviour('scatter-gather')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        buf = bytearray(8)
        n = 0
        while n < 8:
            k = c.recvmsg_into([memoryview(buf)[n:]])[0]
            if k == 0:
                break
            n += k
        out('got', bytes(buf[:n]))
        c.sendall(b'.')
        c.close()
    else:
        s = connect(x)
        out('sent', s.sendmsg([b'ab', b'cde', b'fgh']))
        s.recv(1)
        s.close()


@behaviour('shut-rd-keeps-queued')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        c.sendall(b'queued')
        c.recv(1)
        c.close()
    else:
        s = connect(x)
        select.select([s], [], [], T)
        time.sleep(0.05)
        s.shutdown(socket.SHUT_RD)
        out('read', s.recv(100))
        s.sendall(b'.')
        s.close()


@behaviour('not-connected')
def _(role, x, out, base):
    if role == 'server':
        pass
    else:
        s = socket.socket()
        attempt(out, 'getpeername', lambda: s.getpeername())
        attempt(out, 'send', lambda: s.send(b'x'))
        s.close()


@behaviour('connect-twice')
def _(role, x, out, base):
    if role == 'server':
        served(x)
    else:
        s = connect(x)
        attempt(out, 'again', lambda: s.connect((SERVER, x)))
        s.sendall(b'.')
        s.close()


@behaviour('three-clients')
def _(role, x, out, base):
    if role == 'server':
        got = []
        for _ in range(3):
            c = accept(x)
            got.append(recv_all(c, 1))
            c.close()
        out('got', b''.join(sorted(got)))
    else:
        for b in (b'a', b'b', b'c'):
            s = connect(x)
            s.sendall(b)
            s.close()


@behaviour('makefile-lines')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        f = c.makefile('rwb')
        for _ in range(3):
            f.write(f.readline().upper())
            f.flush()
        c.close()
    else:
        s = connect(x)
        f = s.makefile('rwb')
        r = []
        for w in (b'one\n', b'two\n', b'three\n'):
            f.write(w)
            f.flush()
            r.append(f.readline())
        out('lines', b''.join(r))
        s.close()


@behaviour('send-after-reset')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        c.recv(1)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        c.close()
    else:
        s = connect(x)
        s.sendall(b'.')
        try:
            s.recv(1)
        except OSError:
            pass
        attempt(out, 'send', lambda: s.send(b'x', socket.MSG_NOSIGNAL))
        s.close()


@behaviour('select-idle-timeout')
def _(role, x, out, base):
    if role == 'server':
        served(x)
    else:
        s = connect(x)
        r, _, _ = select.select([s], [], [], 0.1)
        out('readable', bool(r))
        s.sendall(b'.')
        s.close()



@behaviour('recv-zero-length')
def _(role, x, out, base):
    if role == 'server':
        served(x)
    else:
        s = connect(x)
        out('recv0', s.recv(0))
        out('send0', s.send(b''))
        s.sendall(b'.')
        s.close()


@behaviour('accept-cloexec')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        out('inheritable', c.get_inheritable())
        out('listener_name', name(x.getsockname(), base))
        c.recv(1)
        c.close()
    else:
        s = connect(x)
        out('inheritable', s.get_inheritable())
        s.sendall(b'.')
        s.close()


@behaviour('buffer-sizes')
def _(role, x, out, base):
    if role == 'server':
        served(x)
    else:
        s = connect(x)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        out('rcvbuf', s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        out('sndbuf', s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        s.sendall(b'.')
        s.close()


@behaviour('tcp-info-state')
def _(role, x, out, base):
    if role == 'server':
        served(x)
    else:
        s = connect(x)
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        out('state', info[0])
        s.sendall(b'.')
        s.close()


@behaviour('linger-get')
def _(role, x, out, base):
    if role == 'server':
        served(x)
    else:
        s = connect(x)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 5))
        out('linger', struct.unpack('ii', s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)))
        s.sendall(b'.')
        s.close()


@behaviour('options-before-connect')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        out('srv_nodelay', c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0)
        out('srv_rcvbuf', c.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        out('srv_keepalive', c.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
        recv_all(c, 1)
        c.close()
    else:
        s = socket.socket()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 45)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 7))
        s.settimeout(T)
        s.connect((SERVER, x))
        s.settimeout(None)
        out('nodelay', s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0)
        out('keepalive', s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0)
        out('keepidle', s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE))
        out('sndbuf', s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        out('linger', struct.unpack('ii', s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)))
        out('rcvbuf_default', s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) > 0)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        out('nodelay_off', s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        attempt(out, 'bad_option', lambda: s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'x'))
        s.sendall(b'.')
        s.close()


@behaviour('linger-reset-set-before-connect')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        out('got', recv_all(c, 1))
        c.sendall(b'k')
        attempt(out, 'recv', lambda: c.recv(10))
        c.close()
    else:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        s.settimeout(T)
        s.connect((SERVER, x))
        s.settimeout(None)
        s.sendall(b'.')
        out('ack', recv_all(s, 1))
        s.close()


@behaviour('listener-shutdown')
def _(role, x, out, base):
    if role == 'server':
        attempt(out, 'shutdown_wr', lambda: x.shutdown(socket.SHUT_WR))
        attempt(out, 'shutdown', lambda: x.shutdown(socket.SHUT_RDWR))
        x.settimeout(T)
        attempt(out, 'accept', lambda: x.accept() and 'accepted')
    else:
        time.sleep(0.3)
        s = socket.socket()
        s.settimeout(T)
        attempt(out, 'connect', lambda: s.connect((SERVER, x)))
        s.close()


def at_mark(c):
    import fcntl
    return struct.unpack('i', fcntl.ioctl(c.fileno(), 0x8905, b'\0\0\0\0'))[0]  # SIOCATMARK


def urgent_server(x, out, inline):
    c = accept(x)
    if inline:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    _, _, ex = select.select([], [], [c], T)
    out('exceptional', bool(ex))
    out('at_mark_first', at_mark(c))
    attempt(out, 'oob', lambda: c.recv(1, socket.MSG_OOB))
    out('first', c.recv(100))
    out('at_mark_then', at_mark(c))
    attempt(out, 'oob_again', lambda: c.recv(1, socket.MSG_OOB))
    _, _, ex = select.select([], [], [c], 0)
    out('still_exceptional', bool(ex))
    out('rest', read_to_end(c))
    c.close()


def urgent_client(x, out):
    s = connect(x)
    s.sendall(b'ab')
    attempt(out, 'send_oob', lambda: s.send(b'!', socket.MSG_OOB))
    s.sendall(b'cd')
    s.close()


@behaviour('oob')
def _(role, x, out, base):
    # TCP's urgent byte: select's exceptional condition, recv(MSG_OOB), the
    # mark that a read stops at, the byte left out of the stream.
    if role == 'server':
        urgent_server(x, out, False)
    else:
        urgent_client(x, out)


@behaviour('oob-inline')
def _(role, x, out, base):
    # With SO_OOBINLINE the urgent byte stays in the stream (recv(MSG_OOB)
    # is EINVAL); a read still stops at the mark.
    if role == 'server':
        urgent_server(x, out, True)
    else:
        urgent_client(x, out)


@behaviour('recv-after-own-shut-wr')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        out('eof', c.recv(10))
        c.sendall(b'still')
        c.close()
    else:
        s = connect(x)
        s.shutdown(socket.SHUT_WR)
        out('read', recv_all(s, 5))
        attempt(out, 'send', lambda: s.send(b'x', socket.MSG_NOSIGNAL))
        s.close()


@behaviour('peer-name-after-close')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        c.close()
    else:
        s = connect(x)
        out('eof', s.recv(1))
        attempt(out, 'getpeername', lambda: name(s.getpeername(), base))
        s.close()


@behaviour('pollhup')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        out('eof', c.recv(1))
        c.close()
    else:
        s = connect(x)
        s.shutdown(socket.SHUT_WR)
        p = select.poll()
        p.register(s, select.POLLIN)
        recv_all(s, 1)
        time.sleep(0.1)
        ev = dict(p.poll(T * 1000)).get(s.fileno(), 0)
        out('hup', bool(ev & select.POLLHUP))
        out('in', bool(ev & select.POLLIN))
        s.close()


@behaviour('poll-listener')
def _(role, x, out, base):
    if role == 'server':
        p = select.poll()
        p.register(x, select.POLLIN)
        ev = dict(p.poll(WAIT * 1000)).get(x.fileno(), 0)
        out('in', bool(ev & select.POLLIN))
        served(x)
    else:
        s = connect(x)
        s.sendall(b'.')
        s.close()


@behaviour('select-writable')
def _(role, x, out, base):
    if role == 'server':
        served(x)
    else:
        s = connect(x)
        _, w, _ = select.select([], [s], [], T)
        out('writable', bool(w))
        s.sendall(b'.')
        s.close()


@behaviour('epoll-oneshot')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        c.sendall(b'a')
        c.recv(1)
        c.sendall(b'b')
        c.recv(1)
        c.close()
    else:
        s = connect(x)
        e = select.epoll()
        e.register(s, select.EPOLLIN | select.EPOLLONESHOT)
        out('first', len(e.poll(T)))
        out('a', s.recv(1))
        s.sendall(b'.')
        time.sleep(0.1)
        out('disarmed', len(e.poll(0.2)))
        e.modify(s, select.EPOLLIN | select.EPOLLONESHOT)
        out('rearmed', len(e.poll(T)))
        out('b', s.recv(1))
        s.sendall(b'.')
        e.close()
        s.close()


@behaviour('epoll-listener')
def _(role, x, out, base):
    if role == 'server':
        e = select.epoll()
        e.register(x, select.EPOLLIN)
        out('events', [ev for _, ev in e.poll(WAIT)])
        e.close()
        served(x)
    else:
        s = connect(x)
        s.sendall(b'.')
        s.close()


@behaviour('dup')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        out('got', recv_all(c, 2))
        c.close()
    else:
        s = connect(x)
        d = s.dup()
        d.sendall(b'1')
        s.close()
        d.sendall(b'2')
        d.close()


@behaviour('set-nonblocking')
def _(role, x, out, base):
    if role == 'server':
        served(x)
    else:
        s = connect(x)
        os.set_blocking(s.fileno(), False)
        out('blocking', os.get_blocking(s.fileno()))
        attempt(out, 'read', lambda: os.read(s.fileno(), 10))
        os.set_blocking(s.fileno(), True)
        s.sendall(b'.')
        s.close()


@behaviour('sendto-connected')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        out('got', recv_all(c, 1))
        c.close()
    else:
        s = connect(x)
        attempt(out, 'sendto', lambda: s.sendto(b'.', (SERVER, x)))
        s.close()


@behaviour('bind-then-connect')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        out('peer_port', name(c.getpeername(), base))
        c.recv(1)
        c.close()
    else:
        s = socket.socket()
        s.bind(('0.0.0.0', base + 997))
        s.settimeout(T)
        s.connect((SERVER, x))
        out('sock', name(s.getsockname(), base))
        s.sendall(b'.')
        s.close()


@behaviour('listen-twice')
def _(role, x, out, base):
    if role == 'server':
        attempt(out, 'listen', lambda: x.listen(16))
        out('reuseaddr', x.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0)
        served(x)
    else:
        time.sleep(0.1)
        s = connect(x)
        s.sendall(b'.')
        s.close()


@behaviour('close-with-unread-data')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        time.sleep(0.2)  # the client's bytes arrive and stay unread
        c.close()
    else:
        s = connect(x)
        s.sendall(b'unread')
        attempt(out, 'recv', lambda: s.recv(10))
        s.close()


@behaviour('both-half-close')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        out('eof', c.recv(10))
        c.shutdown(socket.SHUT_WR)
        time.sleep(0.1)
        c.close()
    else:
        s = connect(x)
        s.shutdown(socket.SHUT_WR)
        out('eof', s.recv(10))
        s.close()


@behaviour('sendfile')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        out('got', len(recv_all(c, 100000)))
        c.close()
    else:
        import tempfile
        s = connect(x)
        with tempfile.TemporaryFile() as f:
            f.write(b'z' * 100000)
            f.flush()
            f.seek(0)
            out('sent', s.sendfile(f))
        s.close()


@behaviour('read-write-syscalls')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        d = os.read(c.fileno(), 3)
        os.write(c.fileno(), d.upper())
        c.close()
    else:
        s = connect(x)
        os.write(s.fileno(), b'abc')
        out('read', os.read(s.fileno(), 3))
        s.close()


LIBC = None


def libc():
    """The C library's calls as the program would make them (the preload's
    when it is loaded: ctypes resolves names in the global scope)."""
    global LIBC
    if LIBC is None:
        import ctypes
        LIBC = ctypes.CDLL(None, use_errno=True)
    return LIBC


def mmsg_arrays(bufs):
    """struct mmsghdr[] over `bufs` (one iovec each), ctypes-built."""
    import ctypes

    class iovec(ctypes.Structure):
        _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]

    class msghdr(ctypes.Structure):
        _fields_ = [('name', ctypes.c_void_p), ('namelen', ctypes.c_uint32),
                    ('iov', ctypes.POINTER(iovec)), ('iovlen', ctypes.c_size_t),
                    ('control', ctypes.c_void_p), ('controllen', ctypes.c_size_t),
                    ('flags', ctypes.c_int)]

    class mmsghdr(ctypes.Structure):
        _fields_ = [('hdr', msghdr), ('len', ctypes.c_uint)]

    n = len(bufs)
    iovs = (iovec * n)()
    msgs = (mmsghdr * n)()
    keep = []
    for i, b in enumerate(bufs):
        cb = ctypes.create_string_buffer(b, len(b)) if isinstance(b, bytes) else ctypes.create_string_buffer(b)
        keep.append(cb)
        iovs[i].base = ctypes.cast(cb, ctypes.c_void_p)
        iovs[i].len = len(cb) if not isinstance(b, bytes) else len(b)
        msgs[i].hdr.iov = ctypes.pointer(iovs[i])
        msgs[i].hdr.iovlen = 1
    return msgs, keep


@behaviour('sendmmsg-recvmmsg')
def _(role, x, out, base):
    import ctypes
    if role == 'server':
        c = accept(x)
        select.select([c], [], [], T)
        time.sleep(0.1)
        msgs, keep = mmsg_arrays([3, 3, 10])
        n = libc().recvmmsg(c.fileno(), msgs, 3, 0x10000, None)  # MSG_WAITFORONE
        out('recvmmsg', n)
        got = b''.join(keep[i].raw[:msgs[i].len] for i in range(max(n, 0)))
        out('got', got + recv_all(c, 9 - len(got)) if len(got) < 9 else got)
        c.sendall(b'.')
        c.close()
    else:
        s = connect(x)
        msgs, _ = mmsg_arrays([b'abc', b'def', b'ghi'])
        out('sendmmsg', libc().sendmmsg(s.fileno(), msgs, 3, 0))
        out('lens', [msgs[i].len for i in range(3)])
        s.recv(1)
        s.close()


@behaviour('splice')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        r, w = os.pipe()
        got = b''
        while len(got) < 5000:
            n = os.splice(c.fileno(), w, 5000 - len(got))
            if n == 0:
                break
            got += os.read(r, n)
        out('spliced_in', (len(got), hashlib.sha256(got).hexdigest()[:16]))
        os.write(w, b'back')
        out('spliced_out', os.splice(r, c.fileno(), 4))
        c.close()
    else:
        s = connect(x)
        r, w = os.pipe()
        data = bytes(range(256)) * 20
        data = data[:5000]
        os.write(w, data)
        sent = 0
        while sent < len(data):
            sent += os.splice(r, s.fileno(), len(data) - sent)
        out('spliced', sent)
        out('reply', recv_all(s, 4))
        s.close()


@behaviour('epoll-pwait2')
def _(role, x, out, base):
    import ctypes
    if role == 'server':
        c = accept(x)
        c.recv(1)
        time.sleep(0.05)
        c.sendall(b'data')
        c.recv(1)
        c.close()
    else:
        s = connect(x)

        class ev(ctypes.Structure):
            _pack_ = 1
            _fields_ = [('events', ctypes.c_uint32), ('data', ctypes.c_uint64)]

        class ts(ctypes.Structure):
            _fields_ = [('sec', ctypes.c_long), ('nsec', ctypes.c_long)]

        L = libc()
        ep = L.epoll_create1(0)
        e = ev(select.EPOLLIN, 77)
        out('ctl', L.epoll_ctl(ep, 1, s.fileno(), ctypes.byref(e)))
        evs = (ev * 4)()
        out('idle', L.epoll_pwait2(ep, evs, 4, ctypes.byref(ts(0, 20_000_000)), None))
        s.sendall(b'.')
        n = L.epoll_pwait2(ep, evs, 4, ctypes.byref(ts(T, 0)), None)
        out('ready', (n, evs[0].events & select.EPOLLIN != 0, evs[0].data))
        out('read', s.recv(10))
        os.close(ep)
        s.sendall(b'.')
        s.close()


@behaviour('readv-writev')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        select.select([c], [], [], T)
        time.sleep(0.05)
        a, b = bytearray(2), bytearray(2)
        n = os.readv(c.fileno(), [a, b])
        out('got', bytes(a + b)[:n])
        c.sendall(b'.')
        c.close()
    else:
        s = connect(x)
        out('writev', os.writev(s.fileno(), [b'wx', b'yz']))
        s.recv(1)
        s.close()


@behaviour('connect-unreachable-port-zero')
def _(role, x, out, base):
    if role == 'server':
        pass
    else:
        s = socket.socket()
        s.settimeout(T)
        attempt(out, 'connect', lambda: s.connect((SERVER, 0)))
        s.close()


@behaviour('many-small-writes')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        out('got', len(recv_all(c, 1000)))
        c.close()
    else:
        s = connect(x)
        for _ in range(1000):
            s.send(b'.')
        s.close()


@behaviour('peer-address-of-accept')
def _(role, x, out, base):
    if role == 'server':
        c, a = x.accept()
        out('addr_ip', a[0])
        out('family', c.family.name)
        c.recv(1)
        c.close()
    else:
        s = connect(x)
        out('family', s.family.name)
        s.sendall(b'.')
        s.close()


@behaviour('accept-blocking')
def _(role, x, out, base):
    if role == 'server':
        x.settimeout(None)  # a plain blocking accept(), nothing polled first
        c, _ = x.accept()
        out('got', recv_all(c, 1))
        c.close()
    else:
        time.sleep(0.1)
        s = connect(x)
        s.sendall(b'.')
        s.close()


@behaviour('unconnected-names')
def _(role, x, out, base):
    if role == 'server':
        pass
    else:
        s = socket.socket()
        out('sock', s.getsockname())
        attempt(out, 'shutdown', lambda: s.shutdown(socket.SHUT_RDWR))
        s.close()


@behaviour('select-exceptional-idle')
def _(role, x, out, base):
    if role == 'server':
        served(x)
    else:
        s = connect(x)
        _, _, e = select.select([], [], [s], 0.1)
        out('exceptional', bool(e))
        s.sendall(b'.')
        s.close()


@behaviour('fork-child-sends')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        out('got', recv_all(c, 2))
        c.close()
    else:
        s = connect(x)
        pid = os.fork()
        if pid == 0:
            try:
                s.sendall(b'c')
            finally:
                os._exit(0)
        _, st = os.waitpid(pid, 0)
        out('child_exit', os.waitstatus_to_exitcode(st))
        s.sendall(b'p')
        s.close()


@behaviour('fork-child-keeps-options')
def _(role, x, out, base):
    # Options set on a connection before a fork are the child's too, also
    # once the child has used the connection (a SAN connection is claimed
    # by the child's first use).
    if role == 'server':
        c = accept(x)
        out('got', recv_all(c, 2))
        c.close()
    else:
        s = connect(x)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(r)
                s.sendall(b'c')
                v = (s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                     s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                     s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE))
                os.write(w, repr(v).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        out('child_exit', reap(pid))
        out('child_sees', os.read(r, 100).decode())
        os.close(r)
        s.sendall(b'p')
        s.close()


def reap(pid):
    """Waits (at most T) for a forked child; its exit code."""
    deadline = time.time() + T
    while time.time() < deadline:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(st)
        time.sleep(0.005)
    os.kill(pid, 9)
    return 'hung'


def wait_byte(fd):
    """Reads one byte from a pipe, waiting at most T."""
    r, _, _ = select.select([fd], [], [], T)
    return os.read(fd, 1) if r else b'<timeout>'


def eof_after(c):
    """Reads to the end of the stream: the bytes, and the seconds it took."""
    t0 = time.time()
    c.settimeout(T)
    b = b''
    try:
        while True:
            x = c.recv(4096)
            if not x:
                break
            b += x
    except OSError as e:
        b += b'<' + err_name(e).encode() + b'>'
    return b, time.time() - t0


@behaviour('fork-per-connection')
def _(role, x, out, base):
    # socketserver.ForkingTCPServer's shape: the parent closes its copy at
    # once, the child serves the connection and exits.
    if role == 'server':
        c = accept(x)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                line = recv_all(c, 6)
                c.sendall(b'child:' + line)
                c.shutdown(socket.SHUT_WR)
                c.close()
                code = 0
            finally:
                os._exit(code)
        c.close()
        out('child_exit', reap(pid))
    else:
        s = connect(x)
        s.sendall(b'hello!')
        b, _ = eof_after(s)
        out('got', b)
        s.close()


@behaviour('fork-child-holds-it-open')
def _(role, x, out, base):
    # The parent closes; a child that never touches the socket still holds
    # it: the end of the stream comes only when the child exits.
    if role == 'server':
        c = accept(x)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            wait_byte(r)  # until the parent says so
            os._exit(0)
        os.close(r)
        c.sendall(b'p')
        c.close()
        time.sleep(0.3)
        os.write(w, b'.')
        os.close(w)
        out('child_exit', reap(pid))
    else:
        s = connect(x)
        b, took = eof_after(s)
        out('got', b)
        out('eof_waited_for_the_child', took >= 0.25)
        s.close()


@behaviour('fork-child-closes-its-copy')
def _(role, x, out, base):
    # A child that closes its copy at once holds nothing: the parent's
    # close ends the connection, while the child lives on.
    if role == 'server':
        c = accept(x)
        r, w = os.pipe()
        r2, w2 = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.close(r2)
            c.close()
            os.write(w2, b'.')  # closed
            wait_byte(r)  # lives on until the parent says so
            os._exit(0)
        os.close(r)
        os.close(w2)
        out('child_closed', wait_byte(r2))
        c.sendall(b'p')
        c.close()
        time.sleep(0.5)
        os.write(w, b'.')
        os.close(w)
        os.close(r2)
        out('child_exit', reap(pid))
    else:
        s = connect(x)
        b, took = eof_after(s)
        out('got', b)
        out('eof_before_the_child_exits', took < 0.4)
        s.close()


@behaviour('fork-both-talk')
def _(role, x, out, base):
    # Parent and child both use the socket, one after the other; the
    # child exits normally (its copy closes), the parent goes on.
    if role == 'server':
        c = accept(x)
        out('first', recv_all(c, 1))
        pid = os.fork()
        if pid == 0:
            try:
                c.sendall(b'c')
                got = recv_all(c, 1)
                c.sendall(got.upper())
            finally:
                os._exit(0)
        out('child_exit', reap(pid))
        c.sendall(b'p')
        out('last', recv_all(c, 1))
        c.close()
    else:
        s = connect(x)
        s.sendall(b'a')
        out('from_child', recv_all(s, 1))
        s.sendall(b'b')
        out('child_echo', recv_all(s, 1))
        out('from_parent', recv_all(s, 1))
        s.sendall(b'z')
        b, _ = eof_after(s)
        out('end', b)
        s.close()


@behaviour('dual-stack-listener')
def _(role, x, out, base):
    # A listener on [::] (IPV6_V6ONLY off), as many servers open one: IPv4
    # clients appear as v4-mapped IPv6 addresses.
    if role == 'server':
        c, peer = x.accept()
        out('family', c.family.name)
        out('peer', name(peer, base))
        out('peer_name', name(c.getpeername(), base))
        out('local_name', name(c.getsockname(), base))
        out('domain', c.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN))
        out('got', recv_all(c, 3))
        c.sendall(b'v6!')
        c.close()
    else:
        s = connect(x)
        s.sendall(b'abc')
        out('got', recv_all(s, 3))
        out('peer_name', name(s.getpeername(), base))
        s.close()


@behaviour('v6-client')
def _(role, x, out, base):
    # An AF_INET6 client (as Java's and other dual-stack programs open)
    # reaching an IPv4 server through a v4-mapped address.
    if role == 'server':
        c = accept(x)
        out('peer_family', c.family.name)
        out('got', recv_all(c, 3))
        c.sendall(b'v4!')
        c.close()
    else:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.settimeout(T)
        s.connect(('::ffff:' + SERVER, x))
        s.settimeout(None)
        out('family', s.family.name)
        out('peer', name(s.getpeername(), base))
        out('local_is_mapped', s.getsockname()[0].startswith('::ffff:198.18.'))
        out('domain', s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN))
        s.sendall(b'abc')
        out('got', recv_all(s, 3))
        s.close()


@behaviour('tcp-info')
def _(role, x, out, base):
    # TCP_INFO of a connection that exchanged bytes: its state and byte
    # counts (tcpi_bytes_acked counts the SYN).
    if role == 'server':
        c = accept(x)
        out('got', recv_all(c, 10))
        c.sendall(b'y' * 7)
        recv_all(c, 1)
        c.close()
    else:
        s = connect(x)
        s.sendall(b'x' * 10)
        out('reply', recv_all(s, 7))
        b = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
        out('state', b[0])
        out('bytes_acked', struct.unpack_from('Q', b, 120)[0])
        out('bytes_received', struct.unpack_from('Q', b, 128)[0])
        out('mss_set', struct.unpack_from('I', b, 16)[0] > 0)
        s.sendall(b'.')
        s.close()


@behaviour('scm-rights')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        out('got', recv_all(c, 1))
        c.close()
    else:
        s = connect(x)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        socket.send_fds(a, [b'fd'], [s.fileno()])
        _, fds, _, _ = socket.recv_fds(b, 2, 1)
        s.close()
        r = socket.socket(fileno=fds[0])
        attempt(out, 'send_on_received', lambda: r.send(b'r'))
        r.close()
        a.close()
        b.close()


@behaviour('scm-rights-keeps-options')
def _(role, x, out, base):
    # Options set on a connection travel with it in an SCM_RIGHTS message.
    if role == 'server':
        c = accept(x)
        out('got', recv_all(c, 1))
        c.close()
    else:
        s = connect(x)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        socket.send_fds(a, [b'fd'], [s.fileno()])
        _, fds, _, _ = socket.recv_fds(b, 2, 1)
        s.close()
        r = socket.socket(fileno=fds[0])
        attempt(out, 'send_on_received', lambda: r.send(b'r'))
        out('options', (r.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                        r.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)))
        r.close()
        a.close()
        b.close()


def read_to_end(c):
    d = b''
    while True:
        x = c.recv(4096)
        if not x:
            return d
        d += x


@behaviour('exec-keeps-socket')
def _(role, x, out, base):
    # A forked child execs a program that uses the connection it inherited
    # (same number); the parent sends after it exits.
    if role == 'server':
        c = accept(x)
        out('got', read_to_end(c))
        c.close()
    else:
        s = connect(x)
        fd = s.fileno()
        code = ('import socket, sys; s = socket.socket(fileno=int(sys.argv[1])); '
                's.sendall(b"exec,"); print(s.family.name, s.type.name, s.getpeername()[0], flush=True)')
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.set_inheritable(fd, True)
                os.dup2(w, 1)
                os.execv(sys.executable, [sys.executable, '-c', code, str(fd)])
            finally:
                os._exit(127)
        os.close(w)
        out('child_exit', reap(pid))
        out('child_said', os.read(r, 200).decode().strip())
        os.close(r)
        s.sendall(b'parent')
        s.close()


@behaviour('spawn-keeps-socket')
def _(role, x, out, base):
    # posix_spawn of a program that uses an inheritable connection; the
    # parent sends after it exits.
    if role == 'server':
        c = accept(x)
        out('got', read_to_end(c))
        c.close()
    else:
        s = connect(x)
        fd = s.fileno()
        os.set_inheritable(fd, True)
        code = ('import socket, sys; s = socket.socket(fileno=int(sys.argv[1])); '
                's.sendall(b"spawned,"); s.detach()')
        pid = os.posix_spawn(sys.executable, [sys.executable, '-c', code, str(fd)], os.environ)
        out('child_exit', reap(pid))
        s.sendall(b'parent')
        s.close()


@behaviour('exec-inetd-style')
def _(role, x, out, base):
    # inetd's shape: a child puts the connection on its standard input and
    # output, closes the original and execs a program that reads stdin and
    # writes stdout; the parent closes its copy at once.
    if role == 'server':
        c = accept(x)
        c.sendall(b'hello\n')
        out('got', read_to_end(c))
        c.close()
    else:
        s = connect(x)
        pid = os.fork()
        if pid == 0:
            try:
                os.dup2(s.fileno(), 0)
                os.dup2(s.fileno(), 1)
                s.close()
                os.execv(sys.executable, [sys.executable, '-c',
                         'import os; os.write(1, os.read(0, 6).upper())'])
            finally:
                os._exit(127)
        s.close()
        out('child_exit', reap(pid))


@behaviour('tcp-keepidle')
def _(role, x, out, base):
    if role == 'server':
        served(x)
    else:
        s = connect(x)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 42)
        out('keepidle', s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE))
        s.sendall(b'.')
        s.close()


@behaviour('send-until-eagain')
def _(role, x, out, base):
    if role == 'server':
        c = accept(x)
        time.sleep(0.3)  # the client fills what the path holds first
        d = b''
        while True:
            k = c.recv(1 << 16)
            if not k:
                break
            d += k
        out('all_read', len(d) >= 12 and len(d) - 12 == int(d[-12:]))
        c.close()
    else:
        s = connect(x)
        s.setblocking(False)
        sent, blocked = 0, False
        deadline = time.time() + T
        while time.time() < deadline:
            try:
                sent += s.send(b'x' * 65536)
            except BlockingIOError:
                blocked = True
                break
        out('eagain', blocked)
        s.setblocking(True)
        s.sendall(b'%012d' % sent)  # the count, after the bytes
        s.close()


def main():
    role = sys.argv[1]
    if role == 'list':
        for n, _ in BEHAVIOURS:
            print(n)
        return
    base = int(sys.argv[2])
    lock = threading.Lock()
    only = os.environ.get('DIFF_ONLY')  # a comma-separated subset, for a quick look
    if only:
        BEHAVIOURS[:] = [b for b in BEHAVIOURS if b[0] in only.split(',')]

    def printer(n):
        def out(key, value):
            with lock:
                print(n, role, key, value, flush=True)
        return out

    if role == 'server':
        ls = []
        for i, (n, f) in enumerate(BEHAVIOURS):
            if n.startswith('dual-stack'):
                # An IPv6 socket on [::] that takes IPv4 clients too.
                l = socket.socket(socket.AF_INET6)
                l.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                l.bind(('::', base + i))
            else:
                l = socket.socket()
                l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                l.bind(('0.0.0.0', base + i))
            l.listen(8)
            l.settimeout(WAIT)
            ls.append(l)
        print('listening', flush=True)

        def run(n, f, l):
            try:
                f('server', l, printer(n), base)
            except Exception as e:  # an observation too
                printer(n)('exception', err_name(e))

        ts = [threading.Thread(target=run, args=(n, f, l)) for (n, f), l in zip(BEHAVIOURS, ls)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(WAIT)
        print('server done', flush=True)
    else:
        for i, (n, f) in enumerate(BEHAVIOURS):
            try:
                f('client', base + i, printer(n), base)
            except Exception as e:
                printer(n)('exception', err_name(e))
        print('client done', flush=True)


main()
