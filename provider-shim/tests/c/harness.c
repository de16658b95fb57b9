/* A line-driven test harness over the dsan provider C ABI: reads one command
 * per line on stdin, prints one result line on stdout. Used by the lab tests
 * (control/tests/provider.rs); see there for the scenarios. */
#include "dsan_provider.h"
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define MAXS 1024
static int efds[MAXS];
static int conn_socks[256];
static int conn_results[256];
static int nconn;

static struct sockaddr_in sin_of(const char *ip, int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    inet_pton(AF_INET, ip, &a.sin_addr);
    return a;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int cond_accept(const struct sockaddr *c, socklen_t l, void *ctx) { (void)c; (void)l; (void)ctx; return DSAN_CF_ACCEPT; }
static int cond_reject(const struct sockaddr *c, socklen_t l, void *ctx) { (void)c; (void)l; (void)ctx; return DSAN_CF_REJECT; }
static int cond_defer(const struct sockaddr *c, socklen_t l, void *ctx) { (void)c; (void)l; (void)ctx; return DSAN_CF_DEFER; }

/* Collects finished nonblocking connects (waits up to ms for all). */
static void collect(int ms) {
    double end = now_ms() + ms;
    for (;;) {
        int pending = 0;
        for (int i = 0; i < nconn; i++) {
            if (conn_results[i] != 1) continue; /* 1 = pending */
            dsan_network_events ev;
            int s = conn_socks[i];
            if (dsan_enum_network_events(s, &ev) == 0 && (ev.events & DSAN_FD_CONNECT))
                conn_results[i] = ev.connect_error;
            else
                pending++;
        }
        if (!pending || now_ms() > end) return;
        usleep(200);
    }
}

static void bad(void) {
    struct sockaddr_in a = sin_of("198.18.0.2", 7777);
    int s = dsan_socket();
    printf("close_unknown %d ", dsan_close(12345));
    printf("close_negative %d ", dsan_close(-1));
    printf("bind_null %d ", dsan_bind(s, NULL, sizeof a));
    printf("bind_short %d ", dsan_bind(s, (struct sockaddr *)&a, 3));
    struct sockaddr_in6 a6;
    memset(&a6, 0, sizeof a6);
    a6.sin6_family = AF_INET6;
    printf("bind_inet6 %d ", dsan_bind(s, (struct sockaddr *)&a6, sizeof a6));
    printf("listen_unbound %d ", dsan_listen(s, 4));
    printf("listen_unknown %d ", dsan_listen(4321, 4));
    printf("enum_null %d ", dsan_enum_network_events(s, NULL));
    printf("accept_not_listening %d ", dsan_accept(s, NULL, NULL, NULL, NULL));
    printf("connect_null %d ", dsan_connect(s, NULL, sizeof a));
    printf("evsel_bad_fd %d ", dsan_event_select(s, -1, DSAN_FD_ACCEPT));
    int e = eventfd(0, EFD_NONBLOCK);
    printf("evsel_bad_mask %d ", dsan_event_select(s, e, 0x8000));
    struct sockaddr_in out = sin_of("10.1.2.3", 80);
    printf("connect_no_san_subnet %d ", dsan_connect(s, (struct sockaddr *)&out, sizeof out));
    int l = dsan_socket();
    struct sockaddr_in la = sin_of("0.0.0.0", 7001);
    dsan_bind(l, (struct sockaddr *)&la, sizeof la);
    dsan_listen(l, 2);
    struct sockaddr_in peer;
    printf("accept_peer_len_null %d ", dsan_accept(l, (struct sockaddr *)&peer, NULL, NULL, NULL));
    socklen_t small = 4;
    printf("accept_peer_len_small %d ", dsan_accept(l, (struct sockaddr *)&peer, &small, NULL, NULL));
    int l2 = dsan_socket();
    dsan_bind(l2, (struct sockaddr *)&la, sizeof la);
    printf("listen_in_use %d ", dsan_listen(l2, 2));
    dsan_close(l2);
    dsan_close(l);
    printf("use_after_close %d ", dsan_listen(l, 2));
    /* A connect in progress, then a second one. */
    int c = dsan_socket();
    int ce = eventfd(0, EFD_NONBLOCK);
    dsan_event_select(c, ce, DSAN_FD_CONNECT);
    struct sockaddr_in nobody = sin_of("198.18.0.99", 80);
    printf("connect_nonblocking %d ", dsan_connect(c, (struct sockaddr *)&nobody, sizeof nobody));
    printf("connect_again %d ", dsan_connect(c, (struct sockaddr *)&nobody, sizeof nobody));
    dsan_close(c);
    close(ce);
    dsan_close(s);
    close(e);
    printf("done\n");
}

int main(void) {
    char line[512];
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 0; i < MAXS; i++) efds[i] = -1;
    while (fgets(line, sizeof line, stdin)) {
        char cmd[64] = "", a1[128] = "", a2[128] = "", a3[128] = "";
        sscanf(line, "%63s %127s %127s %127s", cmd, a1, a2, a3);
        if (!strcmp(cmd, "startup")) {
            printf("%d\n", dsan_startup(a1[0] ? a1 : NULL));
        } else if (!strcmp(cmd, "cleanup")) {
            printf("%d\n", dsan_cleanup());
        } else if (!strcmp(cmd, "socket")) {
            printf("%d\n", dsan_socket());
        } else if (!strcmp(cmd, "bind")) {
            struct sockaddr_in a = sin_of(a2, atoi(a3));
            printf("%d\n", dsan_bind(atoi(a1), (struct sockaddr *)&a, sizeof a));
        } else if (!strcmp(cmd, "listen")) {
            printf("%d\n", dsan_listen(atoi(a1), atoi(a2)));
        } else if (!strcmp(cmd, "evsel")) {
            int s = atoi(a1);
            if (s >= 0 && s < MAXS && efds[s] < 0) efds[s] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
            printf("%d\n", dsan_event_select(s, s >= 0 && s < MAXS ? efds[s] : -1, (uint32_t)strtoul(a2, NULL, 0)));
        } else if (!strcmp(cmd, "evcount")) {
            /* How many times the provider signalled the eventfd (drains it). */
            int s = atoi(a1);
            uint64_t v = 0;
            if (s >= 0 && s < MAXS && efds[s] >= 0 && read(efds[s], &v, 8) != 8) v = 0;
            printf("%llu\n", (unsigned long long)v);
        } else if (!strcmp(cmd, "enum")) {
            dsan_network_events ev = {0, 0, 0, 0};
            int rc = dsan_enum_network_events(atoi(a1), &ev);
            printf("%d %u %d %d\n", rc, ev.events, ev.accept_error, ev.connect_error);
        } else if (!strcmp(cmd, "accept")) {
            struct sockaddr_in peer;
            socklen_t len = sizeof peer;
            dsan_condition_fn f = !strcmp(a2, "reject") ? cond_reject : !strcmp(a2, "defer") ? cond_defer : !strcmp(a2, "null") ? NULL : cond_accept;
            int rc = dsan_accept(atoi(a1), (struct sockaddr *)&peer, &len, f, NULL);
            char ip[32] = "-";
            if (rc >= 0) inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof ip);
            printf("%d %s:%d\n", rc, ip, rc >= 0 ? ntohs(peer.sin_port) : 0);
        } else if (!strcmp(cmd, "connect")) {
            struct sockaddr_in a = sin_of(a2, atoi(a3));
            double t0 = now_ms();
            int rc = dsan_connect(atoi(a1), (struct sockaddr *)&a, sizeof a);
            printf("%d %.1f\n", rc, now_ms() - t0);
        } else if (!strcmp(cmd, "connectn")) {
            /* N event-selected (nonblocking) connects; prints their immediate results. */
            int n = atoi(a1);
            struct sockaddr_in a = sin_of(a2, atoi(a3));
            nconn = 0;
            for (int i = 0; i < n && i < 256; i++) {
                int s = dsan_socket();
                int e = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
                dsan_event_select(s, e, DSAN_FD_CONNECT);
                efds[s] = e;
                int rc = dsan_connect(s, (struct sockaddr *)&a, sizeof a);
                conn_socks[nconn] = s;
                conn_results[nconn++] = rc == -EINPROGRESS ? 1 : rc;
                if (rc != -EINPROGRESS) printf("immediate %d ", rc);
            }
            printf("started %d\n", nconn);
        } else if (!strcmp(cmd, "results")) {
            /* Waits up to a1 ms, then prints each connect's result (1 = still pending). */
            double t0 = now_ms();
            collect(atoi(a1));
            for (int i = 0; i < nconn; i++) printf("%d ", conn_results[i]);
            printf("| %.1f\n", now_ms() - t0);
        } else if (!strcmp(cmd, "waitdone")) {
            /* Waits until at least a1 connects finished (at most a2 ms); prints the elapsed ms. */
            int want = atoi(a1);
            double t0 = now_ms(), end = t0 + atoi(a2);
            for (;;) {
                collect(0);
                int done = 0;
                for (int i = 0; i < nconn; i++) done += conn_results[i] != 1;
                if (done >= want || now_ms() > end) { printf("%d %.1f\n", done, now_ms() - t0); break; }
                usleep(100);
            }
        } else if (!strcmp(cmd, "send")) {
            /* send S N: N bytes (at most 4096) on connected socket S. */
            static char zeros[4096];
            size_t n = (size_t)atoi(a2);
            printf("%zd\n", dsan_send(atoi(a1), zeros, n > sizeof zeros ? sizeof zeros : n, 0));
        } else if (!strcmp(cmd, "close")) {
            printf("%d\n", dsan_close(atoi(a1)));
        } else if (!strcmp(cmd, "bad")) {
            bad();
        } else if (!strcmp(cmd, "quit")) {
            return 0;
        } else {
            printf("unknown\n");
        }
    }
    return 0;
}
