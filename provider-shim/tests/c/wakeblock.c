/* A hostile process for the lab tests: it listens on the SAN with a wake
 * socket (an AF_UNIX datagram socket bound to a "\0dsan-wake/" name, which
 * the daemon's dataplane core signals itself) for FD_ACCEPT, and reads that
 * socket into a page registered with userfaultfd whose fault it never
 * resolves: its reading thread sleeps inside the kernel's copy for good,
 * holding the socket's receive lock. Were the daemon's signal to take that
 * lock (as a pipe's write takes the pipe's mutex), the second request for
 * the port would stall every process on the host. It never accepts.
 *
 *   wakeblock PORT     prints "ready", then waits for its stdin to close
 */
#define _GNU_SOURCE
#include "dsan_provider.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

static int wake;
static char *trap;

static void *reader(void *arg) {
  (void)arg;
  /* Sleeps until the first token, then inside the copy to `trap`. */
  ssize_t r = recv(wake, trap, 64, 0);
  (void)r;
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 2 || dsan_startup(NULL) != 0) return 2;
  int s = dsan_socket();
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)atoi(argv[1]));
  if (dsan_bind(s, (struct sockaddr *)&a, sizeof a) || dsan_listen(s, 64)) return 3;

  wake = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un u;
  memset(&u, 0, sizeof u);
  u.sun_family = AF_UNIX;
  const char prefix[] = "\0dsan-wake/";
  memcpy(u.sun_path, prefix, sizeof prefix - 1);
  unsigned char r[16];
  if (getrandom(r, sizeof r, 0) != sizeof r) return 4;
  for (int i = 0; i < 16; i++) sprintf(u.sun_path + sizeof prefix - 1 + 2 * i, "%02x", r[i]);
  socklen_t len = (socklen_t)(sizeof(sa_family_t) + sizeof prefix - 1 + 32);
  if (bind(wake, (struct sockaddr *)&u, len) != 0) return 5;
  if (dsan_event_select(s, wake, DSAN_FD_ACCEPT) != 0) return 6;

  int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
  if (uffd < 0) return 7;
  struct uffdio_api api = {.api = UFFD_API};
  if (ioctl(uffd, UFFDIO_API, &api) != 0) return 8;
  trap = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (trap == MAP_FAILED) return 9;
  struct uffdio_register reg = {
      .range = {.start = (unsigned long)trap, .len = 4096},
      .mode = UFFDIO_REGISTER_MODE_MISSING,
  };
  if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) return 10;
  pthread_t t;
  if (pthread_create(&t, NULL, reader, NULL) != 0) return 11;

  printf("ready\n");
  fflush(stdout);
  char buf[16];
  while (read(0, buf, sizeof buf) > 0) {
  }
  /* (The reader stays asleep in the fault: exit takes it along.) */
  _exit(0);
}
