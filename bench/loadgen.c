/* Loopback load generator for the tcpserver benchmarks (compiled by bench/run.py with gcc).
 *
 * Usage: loadgen IP PORT CLIENTS COUNT SECONDS [EXPECT]
 * CLIENTS threads each repeat: connect, read to EOF, close; until COUNT connections are done in
 * all or SECONDS have passed. Connect and each read time out after 3 s. Source addresses rotate
 * over 127.0.0.1-16 so that TIME_WAIT does not exhaust the ephemeral ports. Prints one line:
 * "done N failed F seconds S rate R p50_us P p99_us Q bytes B first F first_p50_us P first_p99_us Q",
 * and with EXPECT " matched M": how many connections received exactly the bytes EXPECT (`make
 * stress`: no reply lost or cut). p50/p99 time a served connection from the start of connect to
 * EOF; first_p50/p99 time it to its first byte, over the F served connections that got one
 * (0 when none did): the latency a client sees of a program that greets it.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TIMEOUT_MS 3000

static struct sockaddr_in target;
static long total_count;
static double deadline;
static atomic_long started, done, failed, received, matched;
static const char *expect;
static size_t expect_length;
static long *latencies, *first_latencies;
static atomic_long first;

static double now(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int wait_for(int fd, short events)
{
  struct pollfd p = {fd, events, 0};
  int r = poll(&p, 1, TIMEOUT_MS);
  return r == 1 ? 0 : -1;
}

static int one_connection(int index, double begin, long *first_us)
{
  char buffer[4096];
  size_t got = 0;
  int same = 1;
  struct sockaddr_in source;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  if (fd == -1) return -1;
  memset(&source, 0, sizeof source);
  source.sin_family = AF_INET;
  source.sin_addr.s_addr = htonl(0x7f000001 + (index % 16));
  bind(fd, (struct sockaddr *) &source, sizeof source);
  if (connect(fd, (struct sockaddr *) &target, sizeof target) == -1) {
    int error = 0;
    socklen_t length = sizeof error;
    if (errno != EINPROGRESS || wait_for(fd, POLLOUT) == -1) { close(fd); return -1; }
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length);
    if (error) { close(fd); return -1; }
  }
  for (;;) {
    ssize_t r = read(fd, buffer, sizeof buffer);
    if (r > 0) {
      if (got == 0) *first_us = (long) ((now() - begin) * 1e6);
      atomic_fetch_add(&received, r);
      if (expect && same) same = got + r <= expect_length && memcmp(expect + got, buffer, r) == 0;
      got += r;
      continue;
    }
    if (r == 0) break;
    if (errno == EAGAIN && wait_for(fd, POLLIN) == 0) continue;
    if (errno == EINTR) continue;
    close(fd);
    if (expect && same && got == expect_length) atomic_fetch_add(&matched, 1);
    return errno == ECONNRESET ? 0 : -1; /* a reset after the program ended still counts as served */
  }
  close(fd);
  if (expect && same && got == expect_length) atomic_fetch_add(&matched, 1);
  return 0;
}

static void *client(void *unused)
{
  (void) unused;
  for (;;) {
    long index = atomic_fetch_add(&started, 1);
    if (index >= total_count || now() > deadline) break;
    double begin = now();
    long first_us = -1;
    if (one_connection((int) index, begin, &first_us) == 0) {
      long slot = atomic_fetch_add(&done, 1);
      latencies[slot] = (long) ((now() - begin) * 1e6);
      if (first_us >= 0) first_latencies[atomic_fetch_add(&first, 1)] = first_us;
    } else {
      atomic_fetch_add(&failed, 1);
    }
  }
  return 0;
}

static int by_value(const void *a, const void *b)
{
  long x = *(const long *) a, y = *(const long *) b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
  if (argc != 6 && argc != 7) {
    fprintf(stderr, "usage: loadgen IP PORT CLIENTS COUNT SECONDS [EXPECT]\n");
    return 100;
  }
  if (argc == 7) {
    expect = argv[6];
    expect_length = strlen(expect);
  }
  int clients = atoi(argv[3]);
  total_count = atol(argv[4]);
  memset(&target, 0, sizeof target);
  target.sin_family = AF_INET;
  target.sin_port = htons((unsigned short) atoi(argv[2]));
  inet_pton(AF_INET, argv[1], &target.sin_addr);
  latencies = calloc(total_count + 1, sizeof *latencies);
  first_latencies = calloc(total_count + 1, sizeof *first_latencies);
  pthread_t *threads = calloc(clients, sizeof *threads);
  double begin = now();
  deadline = begin + atof(argv[5]);
  for (int i = 0; i < clients; ++i) pthread_create(&threads[i], 0, client, 0);
  for (int i = 0; i < clients; ++i) pthread_join(threads[i], 0);
  double seconds = now() - begin;
  long n = atomic_load(&done);
  long f = atomic_load(&first);
  qsort(latencies, n, sizeof *latencies, by_value);
  qsort(first_latencies, f, sizeof *first_latencies, by_value);
  printf("done %ld failed %ld seconds %.3f rate %.1f p50_us %ld p99_us %ld bytes %ld", n, atomic_load(&failed),
         seconds, n / seconds, n ? latencies[n / 2] : 0, n ? latencies[(n * 99) / 100] : 0, atomic_load(&received));
  printf(" first %ld first_p50_us %ld first_p99_us %ld", f, f ? first_latencies[f / 2] : 0,
         f ? first_latencies[(f * 99) / 100] : 0);
  if (expect) printf(" matched %ld", atomic_load(&matched));
  printf("\n");
  return 0;
}
