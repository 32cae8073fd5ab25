/* The floor of `make bench` (issue 10): the least a TCP server can do per connection, compiled by
 * bench/run.py with gcc.
 *
 * Usage: floor THREADS BACKLOG PROGRAM [ARG...]
 * Listens on 127.0.0.1, port 0, prints the port on a line (as `tcpserver -1` does), then THREADS
 * threads each loop: accept, vfork, in the child dup2 the connection onto 0 and 1 and execve
 * PROGRAM with the server's environment; the parent closes the connection. No rules, no
 * environment variables, no log, no limit on concurrency; SIGCHLD ignored, so the kernel reaps
 * (the program gets it back at its default).
 * What every server must pay (the program's own exec above all) is left; anything a real server
 * spends beyond it shows as the distance to this row. Ends on SIGTERM (its default action).
 */
#define _GNU_SOURCE /* accept4 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

extern char **environ;

static int listener;
static char **program;

static void *serve(void *unused)
{
  (void) unused;
  for (;;) {
    int fd = accept4(listener, 0, 0, SOCK_CLOEXEC);
    if (fd == -1) {
      if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE) continue;
      perror("floor: accept");
      _exit(111);
    }
    pid_t pid = vfork();
    if (pid == 0) {
      /* dup2 clears close-on-exec on 0 and 1; the listener and fd itself close at the exec. An
       * ignored SIGCHLD would outlive the exec: the program gets the default back (the child's
       * dispositions are its own copy, so the server's stay). */
      if (dup2(fd, 0) == -1 || dup2(fd, 1) == -1) _exit(111);
      signal(SIGCHLD, SIG_DFL);
      execve(program[0], program, environ);
      _exit(111);
    }
    close(fd);
  }
  return 0;
}

int main(int argc, char **argv)
{
  if (argc < 4) {
    fprintf(stderr, "usage: floor THREADS BACKLOG PROGRAM [ARG...]\n");
    return 100;
  }
  int threads = atoi(argv[1]);
  int backlog = atoi(argv[2]);
  program = argv + 3;
  if (threads < 1 || threads > 64 || backlog < 1) {
    fprintf(stderr, "floor: THREADS 1-64, BACKLOG at least 1\n");
    return 100;
  }
  signal(SIGCHLD, SIG_IGN);
  listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in address;
  memset(&address, 0, sizeof address);
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof address;
  if (bind(listener, (struct sockaddr *) &address, sizeof address) == -1 || listen(listener, backlog) == -1 ||
      getsockname(listener, (struct sockaddr *) &address, &length) == -1) {
    perror("floor: listen");
    return 111;
  }
  printf("%d\n", ntohs(address.sin_port));
  fflush(stdout);
  pthread_t thread;
  for (int i = 1; i < threads; ++i)
    if (pthread_create(&thread, 0, serve, 0) != 0) {
      fprintf(stderr, "floor: cannot start a thread\n");
      return 111;
    }
  serve(0);
  return 0;
}
