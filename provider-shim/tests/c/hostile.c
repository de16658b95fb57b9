/* A process that attaches to dsand legitimately and then attacks it through
 * what it holds, or floods the SAN segment with forged frames. For the lab's
 * hostile tests. Prints one line saying what it observed; exits 0 unless it
 * could not even set up the attack.
 *
 *   hostile SOCKET truncate    memfds: truncate, grow, map the flag page writable
 *   hostile SOCKET scribble    random bytes over the region's first megabyte, ring
 *   hostile SOCKET scribble-wait  attach, print "attached", wait for a line on
 *                              stdin, then scribble as above (so that processes
 *                              attached later are served after it)
 *   hostile SOCKET indices     an impossible command-ring tail, ring
 *   hostile SOCKET garbage     N well-framed slots of garbage, ring, wait until consumed
 *   hostile SOCKET pipe        a pipe and a socket as event descriptors
 *   hostile SOCKET badtyped    malformed typed control requests, then a good one
 *   hostile SOCKET nonblock    clear O_NONBLOCK everywhere, fill the bell, read it away
 *   hostile SOCKET hugeline    a 1 MiB line without a newline
 *   hostile SOCKET fds         a line with 5 descriptors
 *   hostile SOCKET connflood   300 control connections held open at once
 *   hostile forge IFACE DSTMAC PORT N   N well-formed ConnectRequests to PORT, each
 *                              with a new connection id, all from one victim's
 *                              addresses (02:00:00:00:00:99, 198.18.0.77), which
 *                              never answers
 *   hostile flood IFACE DSTMAC PORT N   N forged frames: random ConnectRequests to
 *                              PORT from random sources, and random/mutated bytes
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netpacket/packet.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* Region layout version 2 (docs/wire-protocol.md, "The application channel"). */
#define CMD_OFF 69632
#define CMD_SLOTS 256
#define HEADER_CLOSED 12 /* u32 at offset 12 of the header */

/* The application's control requests (docs/wire-protocol.md). */
#define CTL_MAGIC 0xd5
#define CTL_VERSION 1
#define CTL_ATTACH 1
#define CTL_EVENT_FD 2
#define CTL_ATTACHED 129
#define CTL_REFUSED 132

static int ctl;
static int fds[3] = {-1, -1, -1}; /* region, flag page, bell */
static size_t region_size;

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* Sends a message (a JSON line, or a typed message: dsan_channel::ctl) with
 * descriptors; reads one reply (a line, or a typed message) into reply. */
static int request_bytes(const void *msg, size_t len, const int *sfds, int nfds, char *reply, size_t cap,
                         int *rfds) {
    struct iovec iov = {(void *)msg, len};
    char cbuf[CMSG_SPACE(sizeof(int) * 8)];
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    if (nfds > 0) {
        memset(cbuf, 0, sizeof cbuf);
        m.msg_control = cbuf;
        m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), sfds, sizeof(int) * nfds);
    }
    if (sendmsg(ctl, &m, MSG_NOSIGNAL) < 0) return -1;
    size_t got = 0;
    reply[0] = 0;
    while (got + 1 < cap) {
        char rbuf[CMSG_SPACE(sizeof(int) * 8)];
        struct iovec riov = {reply + got, cap - 1 - got};
        struct msghdr r;
        memset(&r, 0, sizeof r);
        r.msg_iov = &riov;
        r.msg_iovlen = 1;
        r.msg_control = rbuf;
        r.msg_controllen = sizeof rbuf;
        ssize_t n = recvmsg(ctl, &r, 0);
        if (n <= 0) return -1;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&r); c; c = CMSG_NXTHDR(&r, c))
            if (c->cmsg_type == SCM_RIGHTS && rfds)
                memcpy(rfds, CMSG_DATA(c), c->cmsg_len - CMSG_LEN(0));
        got += (size_t)n;
        reply[got] = 0;
        if ((uint8_t)reply[0] == CTL_MAGIC) {
            uint32_t blen;
            if (got >= 8 && (memcpy(&blen, reply + 4, 4), got >= 8 + (size_t)blen)) return 0;
            continue;
        }
        if (reply[got - 1] == '\n') return 0;
    }
    return 0;
}

static int request(const char *line, const int *sfds, int nfds, char *reply, size_t cap, int *rfds) {
    return request_bytes(line, strlen(line), sfds, nfds, reply, cap, rfds);
}

/* A typed request of kind k with body b (dsan_channel::ctl, format 1). */
static int typed(uint8_t k, const void *b, uint32_t blen, const int *sfds, int nfds, char *reply, size_t cap,
                 int *rfds) {
    uint8_t m[64] = {CTL_MAGIC, CTL_VERSION, k, 0};
    memcpy(m + 4, &blen, 4);
    memcpy(m + 8, b, blen);
    return request_bytes(m, 8 + blen, sfds, nfds, reply, cap, rfds);
}

static int attach(const char *path) {
    ctl = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    if (connect(ctl, (struct sockaddr *)&a, sizeof a) != 0) return -1;
    char reply[4096];
    if (typed(CTL_ATTACH, NULL, 0, NULL, 0, reply, sizeof reply, fds) != 0) return -1;
    if ((uint8_t)reply[2] != CTL_ATTACHED || fds[0] < 0 || fds[2] < 0) return -1;
    uint64_t size;
    memcpy(&size, reply + 8 + 8, 8); /* app u64, then region_size u64 */
    region_size = size;
    return 0;
}

static void ring(void) {
    uint64_t one = 1;
    if (write(fds[2], &one, 8) != 8) { /* a full bell only hurts us */ }
}

/* Waits until the daemon marks the region closed (it detached us). */
static int detached(volatile uint8_t *region, int ms) {
    double end = now_ms() + ms;
    while (now_ms() < end) {
        ring();
        if (*(volatile uint32_t *)(region + HEADER_CLOSED)) return 1;
        usleep(1000);
    }
    return 0;
}

static volatile uint8_t *map_region(void) {
    void *p = mmap(NULL, region_size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
    return p == MAP_FAILED ? NULL : p;
}

static int flood(const char *iface, const char *dstmac, int port, long n, int victim) {
    int s = socket(AF_PACKET, SOCK_RAW, htons(0x88b5));
    if (s < 0) { perror("socket"); return 2; }
    struct sockaddr_ll ll;
    memset(&ll, 0, sizeof ll);
    ll.sll_family = AF_PACKET;
    ll.sll_ifindex = (int)if_nametoindex(iface);
    ll.sll_halen = 6;
    unsigned mac[6];
    if (sscanf(dstmac, "%x:%x:%x:%x:%x:%x", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4], &mac[5]) != 6) return 2;
    long sent = 0;
    double t0 = now_ms();
    for (long i = 0; i < n; i++) {
        uint8_t f[64];
        for (int k = 0; k < 64; k++) f[k] = (uint8_t)next();
        for (int k = 0; k < 6; k++) f[k] = (uint8_t)mac[k];
        f[6] = 0x02; /* a unicast, locally administered, random source */
        f[12] = 0x88; f[13] = 0xb5;
        if (victim) {
            /* The victim's MAC and SAN address on every request. */
            f[6] = 0x02; f[7] = 0; f[8] = 0; f[9] = 0; f[10] = 0; f[11] = 0x99;
            f[20] = 198; f[21] = 18; f[22] = 0; f[23] = 77;
        }
        if (victim || i % 2 == 0) {
            /* A well-formed ConnectRequest from a random source address. */
            f[14] = 1; f[15] = 0x01; f[16] = 0; f[17] = 0;
            f[24] = 198; f[25] = 18; f[26] = 0; f[27] = 2; /* dst 198.18.0.2 */
            f[28] = (uint8_t)(port >> 8); f[29] = (uint8_t)port;
            f[30] = 0; f[31] = 24;
            /* The client's offer: a 256 KiB window, 1438-byte payloads. */
            f[48] = 0; f[49] = 4; f[50] = 0; f[51] = 0; f[52] = 0x05; f[53] = 0x9e; f[54] = 0; f[55] = 0;
        } else if (i % 4 == 1) {
            f[14] = 1; /* right version, random rest: mostly malformed */
        }
        memcpy(ll.sll_addr, f, 6);
        if (sendto(s, f, sizeof f, 0, (struct sockaddr *)&ll, sizeof ll) == (ssize_t)sizeof f) sent++;
    }
    double ms = now_ms() - t0;
    printf("sent %ld in %.0f ms (%.0f frames/s)\n", sent, ms, sent / (ms / 1e3));
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 6 && !strcmp(argv[1], "flood")) return flood(argv[2], argv[3], atoi(argv[4]), atol(argv[5]), 0);
    if (argc == 6 && !strcmp(argv[1], "forge")) return flood(argv[2], argv[3], atoi(argv[4]), atol(argv[5]), 1);
    if (argc != 3) { fprintf(stderr, "usage: see the comment at the top\n"); return 2; }
    const char *attack = argv[2];
    if (!strcmp(attack, "connflood")) {
        int c[300], refused = 0, open_ = 0;
        for (int i = 0; i < 300; i++) {
            c[i] = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            struct sockaddr_un a;
            memset(&a, 0, sizeof a);
            a.sun_family = AF_UNIX;
            snprintf(a.sun_path, sizeof a.sun_path, "%s", argv[1]);
            if (connect(c[i], (struct sockaddr *)&a, sizeof a) == 0) open_++;
        }
        /* The refused ones are answered at once; the admitted ones say nothing. */
        double end = now_ms() + 2000;
        for (int i = 0; i < 300; i++) {
            struct pollfd p = {c[i], POLLIN, 0};
            int left = (int)(end - now_ms());
            if (poll(&p, 1, left > 0 ? (i < 64 ? 50 : left) : 0) > 0) {
                char b[512];
                ssize_t n = read(c[i], b, sizeof b - 1);
                if (n > 0) { b[n] = 0; if (strstr(b, "too many")) refused++; }
            }
        }
        for (int i = 0; i < 300; i++) close(c[i]);
        printf("%s connected=%d refused=%d\n", refused >= 200 ? "ok" : "fail", open_, refused);
        return 0;
    }
    if (!strcmp(attack, "hugeline") || !strcmp(attack, "fds")) {
        ctl = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_un a;
        memset(&a, 0, sizeof a);
        a.sun_family = AF_UNIX;
        snprintf(a.sun_path, sizeof a.sun_path, "%s", argv[1]);
        if (connect(ctl, (struct sockaddr *)&a, sizeof a) != 0) return 2;
        char reply[4096];
        if (!strcmp(attack, "fds")) {
            int five[5];
            for (int i = 0; i < 5; i++) five[i] = eventfd(0, 0);
            int r = request("{\"cmd\":\"status\"}\n", five, 5, reply, sizeof reply, NULL);
            printf("%s %s", r == 0 && strstr(reply, "\"ok\":true") ? "fail answered" : "ok refused", r == 0 ? reply : "closed\n");
            return 0;
        }
        size_t len = 1 << 20;
        char *big = malloc(len + 1);
        memset(big, 'x', len);
        big[len] = 0;
        int r = request(big, NULL, 0, reply, sizeof reply, NULL);
        printf("%s\n", r == 0 && strstr(reply, "\"ok\":true") ? "fail answered" : "ok closed");
        return 0;
    }
    if (attach(argv[1]) != 0) { printf("fail attach\n"); return 2; }
    if (!strcmp(attack, "truncate")) {
        int a = ftruncate(fds[0], 0), b = ftruncate(fds[0], (off_t)region_size * 2), c = ftruncate(fds[1], 0);
        void *w = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fds[1], 0);
        int refused = a != 0 && b != 0 && c != 0 && w == MAP_FAILED;
        printf("%s truncate=%d grow=%d page=%d writable-page=%s\n", refused ? "ok refused" : "fail", a, b, c,
               w == MAP_FAILED ? "no" : "yes");
        return 0;
    }
    if (!strcmp(attack, "scribble-wait")) {
        printf("attached\n");
        char line[64];
        if (!fgets(line, sizeof line, stdin)) { printf("fail stdin\n"); return 2; }
        attack = "scribble";
    }
    if (!strcmp(attack, "scribble") || !strcmp(attack, "indices")) {
        volatile uint8_t *r = map_region();
        if (!r) { printf("fail mmap\n"); return 2; }
        if (!strcmp(attack, "scribble")) {
            for (size_t i = 64; i < (1u << 20) && i < region_size; i++) r[i] = (uint8_t)next();
        } else {
            *(volatile uint64_t *)(r + CMD_OFF + 128) = 0xdeadbeefull; /* tail far ahead of head */
        }
        printf("%s\n", detached(r, 5000) ? "ok detached" : "fail still attached");
        return 0;
    }
    if (!strcmp(attack, "garbage")) {
        volatile uint8_t *r = map_region();
        if (!r) { printf("fail mmap\n"); return 2; }
        volatile uint64_t *tail = (volatile uint64_t *)(r + CMD_OFF + 128);
        volatile uint64_t *head = (volatile uint64_t *)(r + CMD_OFF + 64);
        uint64_t t = *tail;
        int pushed = 0;
        double end = now_ms() + 5000;
        while (pushed < 1000 && now_ms() < end) {
            if (t - *head >= CMD_SLOTS) { ring(); usleep(100); continue; }
            volatile uint8_t *slot = r + CMD_OFF + 192 + (t % CMD_SLOTS) * 64;
            for (int k = 0; k < 64; k++) slot[k] = (uint8_t)next();
            if (pushed % 3 == 0) slot[0] = (uint8_t)(1 + next() % 5); /* a known kind, bad fields */
            __atomic_store_n(tail, ++t, __ATOMIC_RELEASE);
            pushed++;
            ring();
        }
        while (*head != t && now_ms() < end) { ring(); usleep(100); }
        int closed = *(volatile uint32_t *)(r + HEADER_CLOSED) != 0;
        printf("%s pushed=%d consumed=%s\n", !closed && *head == t ? "ok consumed" : "fail", pushed,
               *head == t ? "all" : "not all");
        return 0;
    }
    if (!strcmp(attack, "pipe")) {
        int p[2];
        if (pipe(p) != 0) return 2;
        int sv[2];
        socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
        char r1[512], r2[512];
        uint32_t s0 = 0, s1 = 1;
        typed(CTL_EVENT_FD, &s0, 4, &p[1], 1, r1, sizeof r1, NULL);
        typed(CTL_EVENT_FD, &s1, 4, &sv[0], 1, r2, sizeof r2, NULL);
        int refused = (uint8_t)r1[2] == CTL_REFUSED && (uint8_t)r2[2] == CTL_REFUSED;
        printf("%s\n", refused ? "ok refused" : "fail accepted");
        return 0;
    }
    if (!strcmp(attack, "badtyped")) {
        /* Malformed typed requests: another version, an unknown kind, a
         * body of the wrong length, a bad reason, descriptors where none
         * belong. Each is refused with a typed refusal; the attachment and
         * the daemon carry on. */
        char r[512];
        int refused = 0;
        uint8_t wrongver[8] = {CTL_MAGIC, CTL_VERSION + 1, CTL_ATTACH, 0, 0, 0, 0, 0};
        if (request_bytes(wrongver, 8, NULL, 0, r, sizeof r, NULL) == 0 && (uint8_t)r[2] == CTL_REFUSED) refused++;
        if (typed(99, NULL, 0, NULL, 0, r, sizeof r, NULL) == 0 && (uint8_t)r[2] == CTL_REFUSED) refused++;
        uint16_t two = 7;
        if (typed(CTL_EVENT_FD, &two, 2, NULL, 0, r, sizeof r, NULL) == 0 && (uint8_t)r[2] == CTL_REFUSED) refused++;
        uint32_t reason = 200; /* SwitchFallback with no such reason */
        if (typed(6, &reason, 4, NULL, 0, r, sizeof r, NULL) == 0 && (uint8_t)r[2] == CTL_REFUSED) refused++;
        int e = eventfd(0, 0);
        if (typed(5, NULL, 0, &e, 1, r, sizeof r, NULL) == 0 && (uint8_t)r[2] == CTL_REFUSED) refused++;
        /* Still attached and served: a well-formed request is answered. */
        int ok = typed(5, NULL, 0, NULL, 0, r, sizeof r, NULL) == 0 && (uint8_t)r[2] == 130;
        printf("%s refused=%d\n", refused == 5 && ok ? "ok refused" : "fail", refused);
        return 0;
    }
    if (!strcmp(attack, "nonblock")) {
        for (int i = 0; i < 3; i++) fcntl(fds[i], F_SETFL, fcntl(fds[i], F_GETFL) & ~O_NONBLOCK);
        fcntl(ctl, F_SETFL, fcntl(ctl, F_GETFL) & ~O_NONBLOCK);
        uint64_t v = 0xfffffffffffffffeull, got = 0;
        if (write(fds[2], &v, 8) != 8) { /* may be full already */ }
        if (read(fds[2], &got, 8) != 8) got = 0; /* read the bell away */
        ring();
        printf("ok done\n");
        return 0;
    }
    printf("fail unknown attack %s\n", attack);
    return 2;
}
