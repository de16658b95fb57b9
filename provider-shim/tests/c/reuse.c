/* Every byte on its own connection: fresh connections right after closed
 * ones, from C. Built twice: against dsan_provider.h, and with -DVIA_SWITCH
 * against dsan_switch.h (the switch's C ABI, whose connections go over the
 * SAN to a SAN address).
 *
 *   reuse server PORT ROUNDS [abort]
 *       per round: accept A, read it to the end, send "Y<round>" (5 bytes),
 *       close; accept B and close it at once without sending (with "abort",
 *       provider build only: SO_LINGER {1, 0} first, so that B is reset).
 *       Prints "served N".
 *   reuse client IP PORT ROUNDS
 *       per round: connect A, send one byte, SHUT_WR, read the reply to the
 *       end, close A; connect B at once and read it (nonblocking, up to 5 s):
 *       it must give the end of the stream or -ECONNRESET, never a byte.
 *       Prints "rounds N foreign F hung H eof E reset R badreply X" and one
 *       line per fault.
 *   reuse churn-server PORT
 *       accepts for ever; each connection on a thread of its own: reads to
 *       the end, sends every byte back, closes. Prints "listening".
 *   reuse churn-client IP PORT THREADS CONNS
 *       THREADS threads each open CONNS connections one after another; each
 *       sends a payload that names its connection (thread, index, length,
 *       then bytes derived from them), shuts down writing, reads the echo to
 *       the end and compares every byte. Every 64th connection also checks
 *       that a connection closed while its echo is in flight leaves nothing
 *       behind. Prints "conns N bytes B bad X errors E" (bad: connections
 *       whose echo was not exactly their own bytes).
 *
 * Waits are bounded: a nonblocking read polled against a deadline.
 */
#ifdef VIA_SWITCH
#include "dsan_switch.h"
#define S_SOCKET() dsan_sw_socket()
#define S_BIND(s, a, l) dsan_sw_bind(s, a, l)
#define S_LISTEN(s, b) dsan_sw_listen(s, b)
#define S_ACCEPT(s) dsan_sw_accept(s, NULL, NULL)
#define S_CONNECT(s, a, l) dsan_sw_connect(s, a, l)
#define S_SEND(s, b, n) dsan_sw_send(s, b, n, 0)
#define S_RECV(s, b, n, f) dsan_sw_recv(s, b, n, f)
#define S_SHUTDOWN(s, h) dsan_sw_shutdown(s, h)
#define S_CLOSE(s) dsan_sw_close(s)
/* dsan_switch.h has no setsockopt (options reach the switch through the
   preload's setsockopt): "abort" is the provider build's. */
#define S_LINGER0(s) (fprintf(stderr, "abort: not with the switch %d\n", s), exit(2))
#else
#include "dsan_provider.h"
#define S_SOCKET() dsan_socket()
#define S_BIND(s, a, l) dsan_bind(s, a, l)
#define S_LISTEN(s, b) dsan_listen(s, b)
#define S_ACCEPT(s) dsan_accept(s, NULL, NULL, NULL, NULL)
#define S_CONNECT(s, a, l) dsan_connect(s, a, l)
#define S_SEND(s, b, n) dsan_send(s, b, n, 0)
#define S_RECV(s, b, n, f) dsan_recv(s, b, n, f)
#define S_SHUTDOWN(s, h) dsan_shutdown(s, h)
#define S_CLOSE(s) dsan_close(s)
#define S_LINGER0(s) linger0(s)
#endif

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef VIA_SWITCH
static int linger0(int s) {
  struct linger l = {1, 0};
  return dsan_setsockopt(s, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}
#endif

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static struct sockaddr_in addr(const char *ip, int port) {
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  a.sin_addr.s_addr = ip ? inet_addr(ip) : htonl(INADDR_ANY);
  return a;
}

static int listen_on(int port) {
  int l = S_SOCKET();
  struct sockaddr_in a = addr(NULL, port);
  if (l < 0 || S_BIND(l, (struct sockaddr *)&a, sizeof a) || S_LISTEN(l, 1024)) {
    fprintf(stderr, "listen failed\n");
    exit(2);
  }
  printf("listening\n");
  fflush(stdout);
  return l;
}

static int accept_one(int l) {
  for (;;) {
    int s = S_ACCEPT(l);
    if (s >= 0) return s;
    if (s == -EAGAIN || s == -ECONNABORTED || s == -EINTR) continue;
    fprintf(stderr, "accept: %d\n", s);
    exit(2);
  }
}

static int connect_to(const char *ip, int port) {
  for (int tries = 0;; tries++) {
    int s = S_SOCKET();
    if (s < 0) {
      fprintf(stderr, "socket: %d\n", s);
      return s;
    }
    struct sockaddr_in a = addr(ip, port);
    int r = S_CONNECT(s, (struct sockaddr *)&a, sizeof a);
    if (r == 0) return s;
    S_CLOSE(s);
    /* A lossy lab may time a connect out; the server is there. */
    if ((r == -ETIMEDOUT || r == -EAGAIN) && tries < 5) continue;
    return r;
  }
}

/* Reads up to n bytes with a deadline: bytes (>0), 0 at the end of the
   stream, a negative errno, or -ETIME when the deadline passes. */
static ssize_t read_some(int s, void *buf, size_t n, double deadline) {
  for (;;) {
    ssize_t r = S_RECV(s, buf, n, MSG_DONTWAIT);
    if (r != -EAGAIN) return r;
    if (now_s() > deadline) return -ETIME;
    usleep(50);
  }
}

/* Reads to the end of the stream: bytes read, or a negative errno. */
static ssize_t read_all(int s, unsigned char *buf, size_t cap, double deadline) {
  size_t got = 0;
  for (;;) {
    unsigned char tmp[4096];
    ssize_t r = read_some(s, tmp, sizeof tmp, deadline);
    if (r == 0) return (ssize_t)got;
    if (r < 0) return r;
    size_t k = (size_t)r;
    if (got + k > cap) k = cap - got;
    memcpy(buf + got, tmp, k);
    got += k;
  }
}

static int send_all(int s, const unsigned char *p, size_t n) {
  size_t off = 0;
  while (off < n) {
    ssize_t r = S_SEND(s, p + off, n - off);
    if (r <= 0) return (int)r;
    off += (size_t)r;
  }
  return 0;
}

static void reuse_server(int port, int rounds, int abort_b) {
  int l = listen_on(port);
  for (int i = 0; i < rounds; i++) {
    int a = accept_one(l);
    unsigned char buf[64];
    read_all(a, buf, sizeof buf, now_s() + 10);
    char reply[8];
    snprintf(reply, sizeof reply, "Y%04d", i % 10000);
    send_all(a, (unsigned char *)reply, 5);
    S_CLOSE(a);
    int b = accept_one(l);
    if (abort_b) S_LINGER0(b);
    S_CLOSE(b);
  }
  printf("served %d\n", rounds);
  fflush(stdout);
}

static void reuse_client(const char *ip, int port, int rounds) {
  int foreign = 0, hung = 0, eof = 0, reset = 0, badreply = 0;
  for (int i = 0; i < rounds; i++) {
    int a = connect_to(ip, port);
    if (a < 0) {
      printf("round %d: connect A %d\n", i, a);
      exit(3);
    }
    send_all(a, (const unsigned char *)"x", 1);
    S_SHUTDOWN(a, SHUT_WR);
    unsigned char got[64];
    ssize_t n = read_all(a, got, sizeof got, now_s() + 10);
    char want[8];
    snprintf(want, sizeof want, "Y%04d", i % 10000);
    if (n != 5 || memcmp(got, want, 5) != 0) {
      badreply++;
      printf("round %d: A read %zd bytes, not %s\n", i, n, want);
    }
    S_CLOSE(a);
    int b = connect_to(ip, port);
    if (b < 0) {
      printf("round %d: connect B %d\n", i, b);
      exit(3);
    }
    unsigned char c[64];
    ssize_t r = read_some(b, c, sizeof c, now_s() + 5);
    if (r > 0) {
      foreign++;
      printf("round %d: fresh B read %zd bytes: %.*s\n", i, r, (int)r, c);
    } else if (r == 0) {
      eof++;
    } else if (r == -ECONNRESET) {
      reset++;
    } else {
      hung++;
      printf("round %d: B gave %zd\n", i, r);
    }
    S_CLOSE(b);
  }
  printf("rounds %d foreign %d hung %d eof %d reset %d badreply %d\n", rounds, foreign, hung, eof,
         reset, badreply);
  fflush(stdout);
}

/* The payload of connection (t, k): 16-byte header, then derived bytes. */
static size_t payload(unsigned t, unsigned k, unsigned char *p, size_t cap) {
  uint32_t x = t * 2654435761u ^ k * 2246822519u;
  size_t len = 16 + (x % 1500);
  if (len > cap) len = cap;
  uint32_t h[4] = {0x6e6e6f63u /* "conn" */, t, k, (uint32_t)len};
  memcpy(p, h, 16);
  for (size_t i = 16; i < len; i++) {
    x = x * 1103515245u + 12345u;
    p[i] = (unsigned char)(x >> 16) ^ (unsigned char)i;
  }
  return len;
}

static void *churn_conn(void *arg) {
  int s = (int)(intptr_t)arg;
  static __thread unsigned char buf[65536];
  ssize_t n = read_all(s, buf, sizeof buf, now_s() + 30);
  if (n > 0) send_all(s, buf, (size_t)n);
  S_CLOSE(s);
  return NULL;
}

static void churn_server(int port) {
  int l = listen_on(port);
  pthread_attr_t at;
  pthread_attr_init(&at);
  pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
  pthread_attr_setstacksize(&at, 256 * 1024);
  for (;;) {
    int s = accept_one(l);
    pthread_t t;
    if (pthread_create(&t, &at, churn_conn, (void *)(intptr_t)s) != 0) {
      churn_conn((void *)(intptr_t)s);
    }
  }
}

struct churn {
  const char *ip;
  int port;
  unsigned t, conns;
  unsigned long long bytes;
  unsigned done, bad, errors;
};

static void *churn_thread(void *arg) {
  struct churn *c = arg;
  unsigned char out[2048], in[4096];
  for (unsigned k = 0; k < c->conns; k++) {
    size_t len = payload(c->t, k, out, sizeof out);
    int s = connect_to(c->ip, c->port);
    if (s < 0) {
      c->errors++;
      if (c->errors < 5) printf("thread %u conn %u: connect %d\n", c->t, k, s);
      continue;
    }
    if (send_all(s, out, len) != 0 || S_SHUTDOWN(s, SHUT_WR) != 0) {
      c->errors++;
      S_CLOSE(s);
      continue;
    }
    if (k % 64 == 63) {
      /* Closed with its echo still coming: the next connection of this
         thread (likely in the same slot) must see none of it. */
      S_CLOSE(s);
      c->done++;
      continue;
    }
    ssize_t n = read_all(s, in, sizeof in, now_s() + 30);
    if (n < 0) {
      c->errors++;
      if (c->errors < 5) printf("thread %u conn %u: read %zd\n", c->t, k, n);
    } else if ((size_t)n != len || memcmp(in, out, len) != 0) {
      c->bad++;
      if (c->bad < 5) {
        uint32_t h[4] = {0, 0, 0, 0};
        if (n >= 16) memcpy(h, in, 16);
        printf("thread %u conn %u: echo of %zd bytes (want %zu) names thread %u conn %u len %u\n",
               c->t, k, n, len, h[1], h[2], h[3]);
      }
    } else {
      c->bytes += (unsigned long long)n;
    }
    S_CLOSE(s);
    c->done++;
  }
  return NULL;
}

static void churn_client(const char *ip, int port, unsigned threads, unsigned conns) {
  struct churn *cs = calloc(threads, sizeof *cs);
  pthread_t *ts = calloc(threads, sizeof *ts);
  for (unsigned t = 0; t < threads; t++) {
    cs[t] = (struct churn){ip, port, t, conns, 0, 0, 0, 0};
    pthread_create(&ts[t], NULL, churn_thread, &cs[t]);
  }
  unsigned long long bytes = 0;
  unsigned done = 0, bad = 0, errors = 0;
  for (unsigned t = 0; t < threads; t++) {
    pthread_join(ts[t], NULL);
    bytes += cs[t].bytes;
    done += cs[t].done;
    bad += cs[t].bad;
    errors += cs[t].errors;
  }
  printf("conns %u bytes %llu bad %u errors %u\n", done, bytes, bad, errors);
  fflush(stdout);
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
#ifndef VIA_SWITCH
  if (dsan_startup(NULL) != 0) {
    fprintf(stderr, "no daemon\n");
    return 1;
  }
#endif
  if (argc >= 4 && !strcmp(argv[1], "server")) {
    reuse_server(atoi(argv[2]), atoi(argv[3]), argc >= 5 && !strcmp(argv[4], "abort"));
  } else if (argc >= 5 && !strcmp(argv[1], "client")) {
    reuse_client(argv[2], atoi(argv[3]), atoi(argv[4]));
  } else if (argc >= 3 && !strcmp(argv[1], "churn-server")) {
    churn_server(atoi(argv[2]));
  } else if (argc >= 6 && !strcmp(argv[1], "churn-client")) {
    churn_client(argv[2], atoi(argv[3]), (unsigned)atoi(argv[4]), (unsigned)atoi(argv[5]));
  } else {
    fprintf(stderr, "usage: see the comment at the top of reuse.c\n");
    return 2;
  }
  return 0;
}
