/* Loopback TLS load client for the sslserver benchmark (compiled by bench/tls_bench.py with gcc
 * and libssl-dev's headers: gcc -O2 -pthread tls_client.c -lssl -lcrypto).
 *
 * Usage: tls_client IP PORT COUNT CLIENTS SECONDS [tls12|tls13] [resume] [line]
 * CLIENTS threads (K connections in flight) each repeat: TCP connect, TLS handshake (no
 * certificate verification, SNI "localhost"), read to EOF or close_notify, SSL_shutdown, close;
 * until COUNT connections are done in all or SECONDS have passed. Each connect, read and write
 * times out after 10 s (SO_RCVTIMEO/SO_SNDTIMEO). TLS 1.3 unless tls12; with resume, each thread
 * offers the session of its previous connection; with line, it writes "x\n" after the handshake
 * (for a program that answers a line and exits). Source addresses rotate over 127.0.0.1-16 so
 * that TIME_WAIT does not exhaust the ephemeral ports. Prints one line:
 * "done N failed F seconds S rate R p50_us P p99_us Q resumed M bytes B protocol V cipher C".
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define TIMEOUT_S 10

static struct sockaddr_in target;
static long total_count;
static double deadline;
static int resume, send_line;
static SSL_CTX *context;
static atomic_long started, done, failed, resumed, received;
static long *latencies;
static char protocol[32] = "-", cipher[64] = "-";
static pthread_mutex_t names_lock = PTHREAD_MUTEX_INITIALIZER;

static double now(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One connection; 0 when it was served to its end, -1 otherwise. *session: in, the one to offer
 * (or NULL); out, the one to offer next time. */
static int one_connection(int index, SSL_SESSION **session)
{
  char buffer[16384];
  struct sockaddr_in source;
  struct timeval timeout = {TIMEOUT_S, 0};
  int one = 1, result = -1;
  SSL *ssl = NULL;
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd == -1) return -1;
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  memset(&source, 0, sizeof source);
  source.sin_family = AF_INET;
  source.sin_addr.s_addr = htonl(0x7f000001 + (index % 16));
  bind(fd, (struct sockaddr *) &source, sizeof source);
  if (connect(fd, (struct sockaddr *) &target, sizeof target) == -1) goto out;
  ssl = SSL_new(context);
  if (!ssl) goto out;
  SSL_set_fd(ssl, fd);
  SSL_set_tlsext_host_name(ssl, "localhost");
  if (*session) SSL_set_session(ssl, *session);
  if (SSL_connect(ssl) != 1) goto out;
  if (SSL_session_reused(ssl)) atomic_fetch_add(&resumed, 1);
  if (send_line && SSL_write(ssl, "x\n", 2) != 2) goto out;
  for (;;) {
    int r = SSL_read(ssl, buffer, sizeof buffer);
    if (r > 0) { atomic_fetch_add(&received, r); continue; }
    int error = SSL_get_error(ssl, r);
    if (error == SSL_ERROR_ZERO_RETURN) break;                /* close_notify */
    if (error == SSL_ERROR_SYSCALL && ERR_peek_error() == 0 && errno == 0) break;  /* bare EOF */
    if (error == SSL_ERROR_SSL && ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) break;
    goto out;
  }
  SSL_shutdown(ssl);
  if (protocol[0] == '-') {
    pthread_mutex_lock(&names_lock);
    snprintf(protocol, sizeof protocol, "%s", SSL_get_version(ssl));
    snprintf(cipher, sizeof cipher, "%s", SSL_get_cipher_name(ssl));
    pthread_mutex_unlock(&names_lock);
  }
  if (resume) {
    /* TLS 1.3 tickets come after the handshake: the session is complete only now. */
    SSL_SESSION *next = SSL_get1_session(ssl);
    if (*session) SSL_SESSION_free(*session);
    *session = next;
  }
  result = 0;
out:
  ERR_clear_error();
  if (ssl) SSL_free(ssl);
  close(fd);
  return result;
}

static void *worker(void *argument)
{
  int index = (int) (long) argument;
  SSL_SESSION *session = NULL;
  for (;;) {
    long number = atomic_fetch_add(&started, 1);
    if (number >= total_count || now() > deadline) break;
    double begin = now();
    if (one_connection(index + (int) number, &session) == 0) {
      long slot = atomic_fetch_add(&done, 1);
      latencies[slot] = (long) ((now() - begin) * 1e6);
    } else {
      atomic_fetch_add(&failed, 1);
    }
  }
  if (session) SSL_SESSION_free(session);
  return NULL;
}

static int compare(const void *a, const void *b)
{
  long x = *(const long *) a, y = *(const long *) b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
  if (argc < 6) {
    fprintf(stderr, "usage: tls_client IP PORT COUNT CLIENTS SECONDS [tls12|tls13] [resume] [line]\n");
    return 100;
  }
  memset(&target, 0, sizeof target);
  target.sin_family = AF_INET;
  if (inet_pton(AF_INET, argv[1], &target.sin_addr) != 1) { fprintf(stderr, "tls_client: bad IP\n"); return 100; }
  target.sin_port = htons((unsigned short) atoi(argv[2]));
  total_count = atol(argv[3]);
  int clients = atoi(argv[4]);
  double seconds = atof(argv[5]);
  int version = TLS1_3_VERSION;
  for (int i = 6; i < argc; ++i) {
    if (strcmp(argv[i], "tls12") == 0) version = TLS1_2_VERSION;
    else if (strcmp(argv[i], "tls13") == 0) version = TLS1_3_VERSION;
    else if (strcmp(argv[i], "resume") == 0) resume = 1;
    else if (strcmp(argv[i], "line") == 0) send_line = 1;
    else { fprintf(stderr, "tls_client: unknown argument %s\n", argv[i]); return 100; }
  }
  if (total_count <= 0 || clients <= 0 || seconds <= 0) { fprintf(stderr, "tls_client: bad numbers\n"); return 100; }
  context = SSL_CTX_new(TLS_client_method());
  if (!context) { fprintf(stderr, "tls_client: SSL_CTX_new failed\n"); return 111; }
  SSL_CTX_set_min_proto_version(context, version);
  SSL_CTX_set_max_proto_version(context, version);
  SSL_CTX_set_verify(context, SSL_VERIFY_NONE, NULL);
  SSL_CTX_set_session_cache_mode(context, resume ? SSL_SESS_CACHE_CLIENT : SSL_SESS_CACHE_OFF);
  latencies = calloc((size_t) total_count, sizeof *latencies);
  pthread_t *threads = calloc((size_t) clients, sizeof *threads);
  if (!latencies || !threads) return 111;
  double begin = now();
  deadline = begin + seconds;
  for (int i = 0; i < clients; ++i) pthread_create(&threads[i], NULL, worker, (void *) (long) i);
  for (int i = 0; i < clients; ++i) pthread_join(threads[i], NULL);
  double elapsed = now() - begin;
  long served = atomic_load(&done);
  qsort(latencies, (size_t) served, sizeof *latencies, compare);
  long p50 = served ? latencies[served / 2] : 0;
  long p99 = served ? latencies[(served * 99) / 100 < served ? (served * 99) / 100 : served - 1] : 0;
  printf("done %ld failed %ld seconds %.3f rate %.1f p50_us %ld p99_us %ld resumed %ld bytes %ld protocol %s cipher %s\n",
         served, atomic_load(&failed), elapsed, served / elapsed, p50, p99, atomic_load(&resumed),
         atomic_load(&received), protocol, cipher);
  SSL_CTX_free(context);
  return 0;
}
