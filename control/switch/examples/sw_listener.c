/* A switch listener: one descriptor serves kernel TCP and SAN clients.
 *
 *   cc -I provider-shim/include -I control/include sw_listener.c -L target/release -ldsan_switch -o sw_listener
 *   dsanctl lab exec h1 -- ./sw_listener 5000 2
 * prints one line per accepted connection with the transport that serves it.
 */
#include "dsan_switch.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int allow_all(const struct sockaddr *caller, socklen_t len, void *ctx) {
    (void)caller; (void)len; (void)ctx;
    return DSAN_CF_ACCEPT;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 5000;
    int n = argc > 2 ? atoi(argv[2]) : 1;
    int s = dsan_sw_socket();
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port), .sin_addr = { htonl(INADDR_ANY) } };
    int rc = dsan_sw_bind(s, (struct sockaddr *)&a, sizeof a);
    if (rc == 0) rc = dsan_sw_set_condition(s, allow_all, NULL);
    if (rc == 0) rc = dsan_sw_listen(s, 16);
    if (rc < 0) { fprintf(stderr, "listen: %s\n", strerror(-rc)); return 1; }
    printf("listening\n");
    fflush(stdout);
    for (int i = 0; i < n; i++) {
        struct pollfd p = { .fd = s, .events = POLLIN };
        poll(&p, 1, -1); /* the switch descriptor is readable when either kind is ready */
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        int c = dsan_sw_accept(s, (struct sockaddr *)&peer, &len);
        if (c < 0) { printf("accept: %s\n", strerror(-c)); continue; }
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof ip);
        printf("accepted %s %s\n", ip, dsan_sw_transport(c) == DSAN_SW_TRANSPORT_SAN ? "san" : "tcp");
        fflush(stdout);
        dsan_sw_close(c);
    }
    dsan_sw_close(s);
    return 0;
}
