/* Byte streams over the SAN, from C, against dsan_provider.h.
 *
 *   stream server PORT BYTES [seq]   accept one connection; send BYTES while
 *                                    receiving to the end; "seq": receive to
 *                                    the end first, then send (half-close)
 *   stream client IP PORT BYTES [seq] connect; send BYTES (then SHUT_WR)
 *                                    while receiving to the end
 *   stream stall-server PORT          accept; wait for a line on stdin; read all
 *   stream stall-client IP PORT       nonblocking sends until -EAGAIN, then
 *                                    wait for DSAN_FD_WRITE; sends again
 *   stream hold-server PORT / stream hold-client IP PORT
 *                                    connect or accept, print "ready", block in
 *                                    recv; print how it ended and the FD_CLOSE
 *   stream echo-server PORT N         accept N connections, echo 100 bytes on each
 *   stream many IP PORT N             N connections open at once, 100 bytes each way
 *
 * Every result is one line on stdout: "rx BYTES SUM tx BYTES SUM" with FNV-1a
 * sums of the bytes, so the test compares both ends.
 */
#include "dsan_provider.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define CHUNK 65536

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n) {
  for (size_t i = 0; i < n; i++) {
    h ^= p[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

/* The byte at stream offset i of a sender seeded with seed. */
static unsigned char byte_at(uint64_t seed, uint64_t i) {
  uint64_t x = (i + seed) * 0x9e3779b97f4a7c15ULL;
  return (unsigned char)(x >> 56);
}

struct dir {
  int s;
  uint64_t bytes, seed, sum, done;
  long err;
};

static void *sender(void *arg) {
  struct dir *d = arg;
  unsigned char buf[CHUNK];
  d->sum = 0xcbf29ce484222325ULL;
  uint64_t off = 0;
  while (off < d->bytes) {
    size_t n = d->bytes - off < CHUNK ? (size_t)(d->bytes - off) : CHUNK;
    for (size_t i = 0; i < n; i++) buf[i] = byte_at(d->seed, off + i);
    ssize_t r = dsan_send(d->s, buf, n, 0);
    if (r <= 0) {
      d->err = r;
      break;
    }
    d->sum = fnv(d->sum, buf, (size_t)r);
    off += (uint64_t)r;
  }
  d->done = off;
  int r = dsan_shutdown(d->s, SHUT_WR);
  if (r != 0 && d->err == 0) d->err = r;
  return NULL;
}

static void *receiver(void *arg) {
  struct dir *d = arg;
  unsigned char buf[CHUNK];
  d->sum = 0xcbf29ce484222325ULL;
  for (;;) {
    ssize_t r = dsan_recv(d->s, buf, sizeof buf, 0);
    if (r == 0) break;
    if (r < 0) {
      d->err = r;
      break;
    }
    d->sum = fnv(d->sum, buf, (size_t)r);
    d->done += (uint64_t)r;
  }
  return NULL;
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
  int l = dsan_socket();
  struct sockaddr_in a = addr(NULL, port);
  if (l < 0 || dsan_bind(l, (struct sockaddr *)&a, sizeof a) || dsan_listen(l, 1024)) {
    fprintf(stderr, "listen failed\n");
    exit(2);
  }
  printf("listening\n");
  fflush(stdout);
  return l;
}

static int accept_one(int l) {
  int s = dsan_accept(l, NULL, NULL, NULL, NULL);
  if (s < 0) {
    fprintf(stderr, "accept: %d\n", s);
    exit(2);
  }
  return s;
}

static int connect_to(const char *ip, int port) {
  int s = dsan_socket();
  struct sockaddr_in a = addr(ip, port);
  int r = dsan_connect(s, (struct sockaddr *)&a, sizeof a);
  if (r != 0) {
    printf("connect %d\n", r);
    exit(3);
  }
  return s;
}

static void transfer(int s, uint64_t bytes, uint64_t seed, int seq) {
  struct dir tx = {s, bytes, seed, 0, 0, 0}, rx = {s, 0, 0, 0, 0, 0};
  pthread_t t1, t2;
  if (seq) { /* receive to the end, then send */
    receiver(&rx);
    sender(&tx);
  } else {
    pthread_create(&t1, NULL, sender, &tx);
    pthread_create(&t2, NULL, receiver, &rx);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
  }
  printf("rx %llu %llx tx %llu %llx err %ld %ld\n", (unsigned long long)rx.done,
         (unsigned long long)rx.sum, (unsigned long long)tx.done, (unsigned long long)tx.sum, rx.err,
         tx.err);
  fflush(stdout);
  dsan_close(s);
}

static void hold(int s) {
  int efd = eventfd(0, EFD_CLOEXEC);
  printf("ready\n");
  fflush(stdout);
  char c;
  ssize_t r = dsan_recv(s, &c, 1, 0);
  dsan_event_select(s, efd, DSAN_FD_CLOSE);
  dsan_network_events ev;
  memset(&ev, 0, sizeof ev);
  struct pollfd p = {efd, POLLIN, 0};
  poll(&p, 1, 5000);
  dsan_enum_network_events(s, &ev);
  int err = 0;
  socklen_t len = sizeof err;
  dsan_getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len);
  printf("recv %zd close %d close_error %d so_error %d send %zd\n", r, (ev.events & DSAN_FD_CLOSE) != 0,
         ev.close_error, err, dsan_send(s, "x", 1, 0));
  fflush(stdout);
}

static void stall_client(int s) {
  int efd = eventfd(0, EFD_CLOEXEC);
  if (dsan_event_select(s, efd, DSAN_FD_WRITE | DSAN_FD_CLOSE) != 0) exit(4);
  static unsigned char buf[CHUNK];
  uint64_t sent = 0;
  for (;;) {
    ssize_t r = dsan_send(s, buf, sizeof buf, 0);
    if (r == -EAGAIN) break;
    if (r < 0) {
      printf("send %zd\n", r);
      exit(5);
    }
    sent += (uint64_t)r;
  }
  /* The peer reads nothing: stays blocked. Drain the eventfd (FD_WRITE was
     posted at select time) and wait for the next one. */
  uint64_t v;
  dsan_network_events ev;
  dsan_enum_network_events(s, &ev);
  ssize_t again = dsan_send(s, buf, 1, 0);
  printf("blocked %llu again %zd\n", (unsigned long long)sent, again);
  fflush(stdout);
  struct pollfd p = {efd, POLLIN, 0};
  /* A signal whose event the enumeration above took already (the daemon
     sets the event, then its notifier writes the eventfd) wakes the poll
     with no event to report: wait for the next one. */
  int writable = 0, woken = 0;
  for (int tries = 0; tries < 16 && !writable; tries++) {
    if (poll(&p, 1, 20000) != 1 || read(efd, &v, sizeof v) != sizeof v) break;
    woken = 1;
    dsan_enum_network_events(s, &ev);
    writable = (ev.events & DSAN_FD_WRITE) != 0;
  }
  if (woken) {
    ssize_t r = dsan_send(s, buf, sizeof buf, 0);
    printf("writable %d send %zd\n", writable, r);
  } else {
    printf("no FD_WRITE\n");
  }
  fflush(stdout);
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (dsan_startup(NULL) != 0) {
    printf("startup failed\n");
    return 1;
  }
  if (argc >= 4 && !strcmp(argv[1], "server")) {
    int l = listen_on(atoi(argv[2]));
    int s = accept_one(l);
    transfer(s, strtoull(argv[3], NULL, 10), 2, argc > 4);
  } else if (argc >= 5 && !strcmp(argv[1], "client")) {
    int s = connect_to(argv[2], atoi(argv[3]));
    transfer(s, strtoull(argv[4], NULL, 10), 1, 0);
  } else if (argc >= 3 && !strcmp(argv[1], "stall-server")) {
    int l = listen_on(atoi(argv[2]));
    int s = accept_one(l);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 1;
    struct dir rx = {s, 0, 0, 0, 0, 0};
    receiver(&rx);
    printf("rx %llu err %ld\n", (unsigned long long)rx.done, rx.err);
  } else if (argc >= 4 && !strcmp(argv[1], "stall-client")) {
    int s = connect_to(argv[2], atoi(argv[3]));
    stall_client(s);
    dsan_close(s);
  } else if (argc >= 3 && !strcmp(argv[1], "hold-server")) {
    int l = listen_on(atoi(argv[2]));
    hold(accept_one(l));
  } else if (argc >= 4 && !strcmp(argv[1], "hold-client")) {
    hold(connect_to(argv[2], atoi(argv[3])));
  } else if (argc >= 4 && !strcmp(argv[1], "echo-server")) {
    int l = listen_on(atoi(argv[2]));
    int n = atoi(argv[3]);
    int *s = calloc((size_t)n, sizeof *s);
    for (int i = 0; i < n; i++) s[i] = accept_one(l);
    long bad = 0;
    for (int i = 0; i < n; i++) {
      char b[100];
      size_t got = 0;
      while (got < sizeof b) {
        ssize_t r = dsan_recv(s[i], b + got, sizeof b - got, 0);
        if (r <= 0) {
          bad++;
          break;
        }
        got += (size_t)r;
      }
      if (dsan_send(s[i], b, got, 0) != (ssize_t)got) bad++;
    }
    printf("echoed %d bad %ld\n", n, bad);
    for (int i = 0; i < n; i++) dsan_close(s[i]);
  } else if (argc >= 5 && !strcmp(argv[1], "many")) {
    int n = atoi(argv[4]);
    int *s = calloc((size_t)n, sizeof *s);
    for (int i = 0; i < n; i++) s[i] = connect_to(argv[2], atoi(argv[3]));
    printf("connected %d\n", n);
    long bad = 0;
    for (int i = 0; i < n; i++) {
      char b[100];
      memset(b, i & 0xff, sizeof b);
      if (dsan_send(s[i], b, sizeof b, 0) != (ssize_t)sizeof b) bad++;
    }
    for (int i = 0; i < n; i++) {
      char b[100];
      size_t got = 0;
      while (got < sizeof b) {
        ssize_t r = dsan_recv(s[i], b + got, sizeof b - got, 0);
        if (r <= 0) break;
        got += (size_t)r;
      }
      if (got != sizeof b || b[0] != (char)(i & 0xff) || b[99] != (char)(i & 0xff)) bad++;
    }
    printf("many %d bad %ld\n", n, bad);
    for (int i = 0; i < n; i++) dsan_close(s[i]);
  } else {
    fprintf(stderr, "usage: see the comment at the top of stream.c\n");
    return 2;
  }
  dsan_cleanup();
  return 0;
}
