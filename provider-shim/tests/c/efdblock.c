/* A hostile process for the lab tests: it listens on the SAN with a
 * *blocking* eventfd for FD_ACCEPT whose counter it has filled, so that any
 * write to it blocks, and never accepts. If the daemon wrote that eventfd on
 * its dataplane core, the first request for the port would stall every
 * process on the host.
 *
 *   efdblock PORT     prints "ready", then waits for its stdin to close
 */
#include "dsan_provider.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc != 2 || dsan_startup(NULL) != 0) return 2;
  int s = dsan_socket();
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)atoi(argv[1]));
  if (dsan_bind(s, (struct sockaddr *)&a, sizeof a) || dsan_listen(s, 64)) return 3;
  int efd = eventfd(0, 0); /* blocking */
  if (dsan_event_select(s, efd, DSAN_FD_ACCEPT) != 0) return 4;
  uint64_t full = 0xfffffffffffffffeULL; /* the largest counter: a write of 1 blocks */
  if (write(efd, &full, sizeof full) != sizeof full) return 5;
  printf("ready\n");
  fflush(stdout);
  char buf[16];
  while (read(0, buf, sizeof buf) > 0) {
  }
  return 0;
}
