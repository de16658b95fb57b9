/* A small SAN listener: listens on 0.0.0.0:PORT with a backlog, waits on an
 * eventfd for FD_ACCEPT, and accepts (or, with "reject", refuses) every
 * request through a condition function.
 *
 *   cc -I provider-shim/include listener.c -L target/release -ldsan_provider -o listener
 *   dsanctl lab exec h1 -- ./listener 5000 16 accept
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
#include <unistd.h>

static int decide(const struct sockaddr *caller, socklen_t len, void *ctx) {
    char ip[INET_ADDRSTRLEN];
    const struct sockaddr_in *in = (const struct sockaddr_in *)caller;
    (void)len;
    inet_ntop(AF_INET, &in->sin_addr, ip, sizeof ip);
    printf("request from %s:%d\n", ip, ntohs(in->sin_port));
    return *(int *)ctx;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 5000;
    int backlog = argc > 2 ? atoi(argv[2]) : 16;
    int verdict = argc > 3 && !strcmp(argv[3], "reject") ? DSAN_CF_REJECT : DSAN_CF_ACCEPT;
    int rc = dsan_startup(NULL);
    if (rc < 0) { fprintf(stderr, "dsan_startup: %s\n", strerror(-rc)); return 1; }
    int s = dsan_socket();
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port), .sin_addr = { htonl(INADDR_ANY) } };
    if ((rc = dsan_bind(s, (struct sockaddr *)&a, sizeof a)) < 0 || (rc = dsan_listen(s, backlog)) < 0) {
        fprintf(stderr, "listen: %s\n", strerror(-rc));
        return 1;
    }
    int efd = eventfd(0, EFD_CLOEXEC);
    dsan_event_select(s, efd, DSAN_FD_ACCEPT);
    printf("listening on port %d, backlog %d\n", port, backlog);
    fflush(stdout);
    for (;;) {
        struct pollfd p = { .fd = efd, .events = POLLIN };
        poll(&p, 1, -1);
        dsan_network_events ev;
        dsan_enum_network_events(s, &ev);
        for (;;) {
            struct sockaddr_in peer;
            socklen_t len = sizeof peer;
            int c = dsan_accept(s, (struct sockaddr *)&peer, &len, decide, &verdict);
            if (c == -EAGAIN) break;
            if (c < 0) { printf("refused: %s\n", strerror(-c)); continue; }
            printf("accepted socket %d\n", c);
            dsan_close(c);
        }
        fflush(stdout);
    }
}
