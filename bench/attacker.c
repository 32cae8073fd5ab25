/* The attacker of bench/fairness.py (compiled with gcc): one address opening connections fast.
 *
 * Usage: attacker SOURCE_IP IP PORT THREADS RATE SECONDS
 * THREADS threads together open at most RATE connections per second from SOURCE_IP for SECONDS,
 * each closed at once: the program the server runs for it holds its slot on its own. Prints
 * "attempts N connected C".
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in source, target;
static double rate_per_thread, seconds;
static atomic_long attempts, connected;

static double now(void)
{
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void *attack(void *unused)
{
  (void) unused;
  double start = now();
  long mine = 0;
  while (now() - start < seconds) {
    /* Paced: connection k of this thread starts no earlier than k / rate seconds in. */
    double due = start + mine / rate_per_thread;
    double wait = due - now();
    if (wait > 0) {
      struct timespec pause = {(time_t) wait, (long) ((wait - (time_t) wait) * 1e9)};
      nanosleep(&pause, 0);
    }
    mine++;
    atomic_fetch_add(&attempts, 1);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd == -1) continue;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *) &source, sizeof source) == 0
        && connect(fd, (struct sockaddr *) &target, sizeof target) == 0)
      atomic_fetch_add(&connected, 1);
    close(fd);
  }
  return 0;
}

int main(int argc, char **argv)
{
  if (argc != 7) return 100;
  source.sin_family = AF_INET;
  inet_pton(AF_INET, argv[1], &source.sin_addr);
  target.sin_family = AF_INET;
  inet_pton(AF_INET, argv[2], &target.sin_addr);
  target.sin_port = htons(atoi(argv[3]));
  int threads = atoi(argv[4]);
  rate_per_thread = atof(argv[5]) / threads;
  seconds = atof(argv[6]);
  pthread_t workers[64];
  if (threads < 1 || threads > 64) return 100;
  for (int i = 0; i < threads; i++) pthread_create(&workers[i], 0, attack, 0);
  for (int i = 0; i < threads; i++) pthread_join(workers[i], 0);
  printf("attempts %ld connected %ld\n", (long) attempts, (long) connected);
  return 0;
}
