/* A small SAN connector: connects to IP:PORT over the SAN and reports the
 * outcome (0, or the errno: ECONNREFUSED, ECONNRESET, ETIMEDOUT, EHOSTUNREACH).
 *
 *   cc -I provider-shim/include connector.c -L target/release -ldsan_provider -o connector
 *   dsanctl lab exec h0 -- ./connector 198.18.0.2 5000
 */
#include "dsan_provider.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: connector IP PORT\n"); return 2; }
    int rc = dsan_startup(NULL);
    if (rc < 0) { fprintf(stderr, "dsan_startup: %s\n", strerror(-rc)); return 1; }
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2])) };
    if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) { fprintf(stderr, "bad address\n"); return 2; }
    int s = dsan_socket();
    rc = dsan_connect(s, (struct sockaddr *)&a, sizeof a);
    printf("connect %s:%s: %s\n", argv[1], argv[2], rc == 0 ? "connected" : strerror(-rc));
    dsan_close(s);
    dsan_cleanup();
    return rc == 0 ? 0 : 1;
}
