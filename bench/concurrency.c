/* The program `make stress` runs for each client (compiled by bench/stress.py with gcc).
 *
 * Usage: concurrency COUNTER HOLD_MS
 * Counts itself in and out of COUNTER, three native longs (running now, most ever running,
 * programs started) updated under flock, holds its slot HOLD_MS milliseconds, then writes "ok\n"
 * to the client. So the concurrency reached is measured by the programs themselves, not taken
 * from the server's own bookkeeping. Exit 111 on any failure (the client then gets no "ok").
 */
#include <fcntl.h>
#include <stdlib.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

static void update(int fd, long delta)
{
  long counts[3] = {0, 0, 0};
  if (flock(fd, LOCK_EX) == -1) _exit(111);
  if (pread(fd, counts, sizeof counts, 0) != sizeof counts) _exit(111);
  counts[0] += delta;
  if (counts[0] > counts[1]) counts[1] = counts[0];
  if (delta > 0) counts[2] += 1;
  if (pwrite(fd, counts, sizeof counts, 0) != sizeof counts) _exit(111);
  flock(fd, LOCK_UN);
}

int main(int argc, char **argv)
{
  if (argc != 3) return 100;
  int fd = open(argv[1], O_RDWR);
  if (fd == -1) return 111;
  long hold = atol(argv[2]);
  struct timespec pause = {hold / 1000, (hold % 1000) * 1000000L};
  update(fd, 1);
  nanosleep(&pause, 0);
  update(fd, -1);
  if (write(1, "ok\n", 3) != 3) return 111;
  return 0;
}
