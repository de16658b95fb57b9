/* The most common server loop there is, unmodified: socket, bind, listen,
 * then a blocking accept with nothing polled first; each connection's
 * first bytes are read (blocking) and echoed, then it is closed.
 *
 *   blocking_accept PORT N    serves N connections; prints "listening",
 *                             then "accepted PEER read BYTES" for each, or
 *                             "accept ERRNO-TEXT" for a failed accept
 */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc != 3) return 2;
  int s = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((unsigned short)atoi(argv[1]));
  if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 8)) {
    perror("listen");
    return 1;
  }
  printf("listening\n");
  fflush(stdout);
  for (int i = 0; i < atoi(argv[2]); i++) {
    struct sockaddr_in p;
    socklen_t l = sizeof p;
    int c = accept(s, (struct sockaddr *)&p, &l);
    if (c < 0) {
      printf("accept %s\n", strerror(errno));
      fflush(stdout);
      continue;
    }
    char b[64];
    ssize_t n = read(c, b, sizeof b);
    if (n > 0 && write(c, b, (size_t)n) != n) n = -1;
    printf("accepted %s read %zd\n", inet_ntoa(p.sin_addr), n);
    fflush(stdout);
    close(c);
  }
  return 0;
}
