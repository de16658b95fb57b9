/* A client built as Debian builds its packages (-O2 -D_FORTIFY_SOURCE=2),
 * so that its reads go through the C library's fortified entries
 * (__read_chk, __recv_chk, __recvfrom_chk, __poll_chk):
 *
 *   fortified_client IP PORT LEN   three connections to an echo server;
 *                                  on each: send "hello", poll for input,
 *                                  read it back with read, recv, recvfrom
 *                                  (one each; LEN is the size asked for, not
 *                                  known when compiling). Prints
 *                                  "ok read recv recvfrom" or what failed.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int conn(const char *ip, int port) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((unsigned short)port);
  a.sin_addr.s_addr = inet_addr(ip);
  if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
    printf("connect %s\n", strerror(errno));
    exit(1);
  }
  if (write(s, "hello", 5) != 5) {
    printf("write %s\n", strerror(errno));
    exit(1);
  }
  struct pollfd p[1] = {{s, POLLIN, 0}};
  if (poll(p, 1, 5000) != 1) {
    printf("poll %s\n", strerror(errno));
    exit(1);
  }
  return s;
}

int main(int argc, char **argv) {
  if (argc != 4) return 2;
  size_t len = (size_t)atoi(argv[3]);
  char buf[64];
  const char *what[3] = {"read", "recv", "recvfrom"};
  for (int i = 0; i < 3; i++) {
    int s = conn(argv[1], atoi(argv[2]));
    ssize_t n;
    if (i == 0) {
      n = read(s, buf, len);
    } else if (i == 1) {
      n = recv(s, buf, len, 0);
    } else {
      struct sockaddr_in from;
      socklen_t fl = sizeof from;
      n = recvfrom(s, buf, len, 0, (struct sockaddr *)&from, &fl);
    }
    if (n != 5 || memcmp(buf, "hello", 5) != 0) {
      printf("%s gave %zd (%s)\n", what[i], n, n < 0 ? strerror(errno) : "");
      return 1;
    }
    close(s);
  }
  printf("ok read recv recvfrom\n");
  return 0;
}
