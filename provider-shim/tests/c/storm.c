/* Connect storms against a slow accepting application, for the lab tests.
 *
 *   storm server PORT BACKLOG DECIDE_US [all]
 *                                         accept loop; the condition function
 *                                         takes DECIDE_US and accepts two of three
 *                                         requests, refuses the third (with "all":
 *                                         accepts every one). Prints
 *                                         "ready"; on "report" (stdin) prints
 *                                         "accepted A refused R" once its backlog
 *                                         is empty; on "all" starts accepting
 *                                         every request and prints "all"; exits
 *                                         on "quit" or EOF.
 *   storm listen-many BASE N              N listeners on ports BASE..BASE+N-1;
 *                                         prints "listened K error E" (K that
 *                                         succeeded, E the first failure's
 *                                         errno, 0 if none), then holds them
 *                                         until stdin closes.
 *   storm events-many N                  N sockets (not bound), each with its own
 *                                         event descriptor registered;
 *                                         prints "registered K error E" as
 *                                         listen-many, then holds them until
 *                                         stdin closes.
 *   storm client IP PORT MS               blocking connects, one after another,
 *                                         for MS milliseconds; prints
 *                                         "attempts N connected C refused R other O
 *                                         p50_us P p99_us Q" (connect latency of the
 *                                         successful ones)".
 */
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

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static long decide_us;
static unsigned long seen;
static int accept_all;

static int slow_cond(const struct sockaddr *c, socklen_t l, void *ctx) {
    (void)c; (void)l; (void)ctx;
    struct timespec t = {0, decide_us * 1000};
    nanosleep(&t, NULL);
    return (!accept_all && seen++ % 3 == 2) ? DSAN_CF_REJECT : DSAN_CF_ACCEPT;
}

static struct sockaddr_in sin_of(const char *ip, int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    inet_pton(AF_INET, ip, &a.sin_addr);
    return a;
}

static int server(int port, int backlog) {
    if (dsan_startup(NULL) != 0) return 2;
    int s = dsan_socket();
    struct sockaddr_in a = sin_of("0.0.0.0", port);
    if (dsan_bind(s, (struct sockaddr *)&a, sizeof a) != 0 || dsan_listen(s, backlog) < 0) return 2;
    /* Event-selected (nonblocking) so that stdin can be watched too. */
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (dsan_event_select(s, efd, DSAN_FD_ACCEPT) != 0) return 2;
    printf("ready\n");
    fflush(stdout);
    long accepted = 0, refused = 0;
    int report = 0;
    for (;;) {
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        int rc = dsan_accept(s, (struct sockaddr *)&peer, &len, slow_cond, NULL);
        if (rc >= 0) {
            accepted++;
            dsan_close(rc);
            continue;
        }
        if (rc == -ECONNREFUSED) {
            refused++;
            continue;
        }
        if (rc != -EAGAIN) {
            fprintf(stderr, "accept: %d\n", rc);
            return 3;
        }
        if (report) {
            printf("accepted %ld refused %ld\n", accepted, refused);
            report = 0;
        }
        struct pollfd p[2] = {{efd, POLLIN, 0}, {0, POLLIN, 0}};
        if (poll(p, 2, 100) < 0) return 3;
        if (p[0].revents & POLLIN) {
            dsan_network_events ev;
            dsan_enum_network_events(s, &ev);
        }
        if (p[1].revents & (POLLIN | POLLHUP)) {
            char line[64];
            if (!fgets(line, sizeof line, stdin) || !strncmp(line, "quit", 4)) break;
            if (!strncmp(line, "report", 6)) report = 1;
            if (!strncmp(line, "all", 3)) {
                accept_all = 1;
                printf("all\n");
            }
        }
    }
    dsan_close(s);
    dsan_cleanup();
    return 0;
}

/* Prints "WHAT K error E" and holds what was made until stdin closes. */
static int report_and_hold(const char *what, int ok, int first) {
    printf("%s %d error %d\n", what, ok, first);
    fflush(stdout);
    char buf[64];
    while (fgets(buf, sizeof buf, stdin)) {
    }
    return 0;
}

static int listen_many(int base, int n) {
    if (dsan_startup(NULL) != 0) return 2;
    int ok = 0, first = 0;
    for (int i = 0; i < n; i++) {
        int s = dsan_socket();
        struct sockaddr_in a;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_port = htons((uint16_t)(base + i));
        int r = s < 0 ? s : dsan_bind(s, (struct sockaddr *)&a, sizeof a);
        if (r == 0) r = dsan_listen(s, 4);
        if (r >= 0) {
            ok++;
        } else if (first == 0) {
            first = -r;
        }
    }
    return report_and_hold("listened", ok, first);
}

static int events_many(int n) {
    if (dsan_startup(NULL) != 0) return 2;
    int ok = 0, first = 0;
    for (int i = 0; i < n; i++) {
        int s = dsan_socket();
        int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        int r = s < 0 ? s : efd < 0 ? -errno : dsan_event_select(s, efd, DSAN_FD_CONNECT);
        if (r >= 0) {
            ok++;
        } else if (first == 0) {
            first = -r;
        }
    }
    return report_and_hold("registered", ok, first);
}

static int by_value(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

static int client(const char *ip, int port, int ms) {
    if (dsan_startup(NULL) != 0) return 2;
    struct sockaddr_in a = sin_of(ip, port);
    long attempts = 0, connected = 0, refused = 0, other = 0;
    enum { MAXLAT = 1 << 20 };
    static double lat[MAXLAT]; /* successful connects, microseconds */
    double end = now_ms() + ms;
    while (now_ms() < end) {
        int s = dsan_socket();
        if (s < 0) return 2;
        double t0 = now_ms();
        int rc = dsan_connect(s, (struct sockaddr *)&a, sizeof a);
        attempts++;
        if (rc == 0 && connected < MAXLAT) lat[connected] = (now_ms() - t0) * 1e3;
        if (rc == 0) connected++;
        else if (rc == -ECONNREFUSED) refused++;
        else { other++; fprintf(stderr, "connect: %d\n", rc); }
        dsan_close(s);
    }
    long n = connected < MAXLAT ? connected : MAXLAT;
    qsort(lat, (size_t)n, sizeof lat[0], by_value);
    /* Percentiles as decimals (a reader that takes the integers gets the four counts). */
    printf("attempts %ld connected %ld refused %ld other %ld p50_us %.1f p99_us %.1f\n", attempts, connected, refused,
           other, n ? lat[n / 2] : 0.0, n ? lat[(n * 99) / 100] : 0.0);
    dsan_cleanup();
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if ((argc == 5 || argc == 6) && !strcmp(argv[1], "server")) {
        decide_us = atol(argv[4]);
        accept_all = argc == 6 && !strcmp(argv[5], "all");
        return server(atoi(argv[2]), atoi(argv[3]));
    }
    if (argc == 5 && !strcmp(argv[1], "client")) return client(argv[2], atoi(argv[3]), atoi(argv[4]));
    if (argc == 4 && !strcmp(argv[1], "listen-many")) return listen_many(atoi(argv[2]), atoi(argv[3]));
    if (argc == 3 && !strcmp(argv[1], "events-many")) return events_many(atoi(argv[2]));
    fprintf(stderr, "usage: storm server PORT BACKLOG DECIDE_US [all] | storm client IP PORT MS\n");
    return 2;
}
