/* bench/tcplat.c: plain TCP ping-pong over 127.0.0.1, the kernel floor that
 * bench/compare.sh puts next to chanio's tcp 8 B one-way latency (pingpong
 * --transport tcp --size 8).
 *
 *   cc -O2 -pthread -o tcplat bench/tcplat.c && ./tcplat [SIZE_BYTES [ITERS]]
 *
 * Two threads of one process, each with a TCP_NODELAY socket of one
 * connection: the client sends SIZE bytes (default 8) with send(2), the
 * server reads them and sends them back, ITERS times (default 20000, after
 * 1000 unmeasured round trips). Both sides wait for data by spinning on
 * recv(2) with MSG_DONTWAIT, the fastest way the socket API allows (no
 * poll(2), no sleep); nothing else happens: no framing beyond the bytes
 * themselves, no acknowledgements, no completions. Each round trip is timed
 * with clock_gettime(CLOCK_MONOTONIC); one-way latency is half of it. It
 * prints one JSON line {"size":..,"iters":..,"one_way_us":{"p50":..,
 * "mean":..}}. The listener binds 127.0.0.1 on a port the kernel picks; both
 * sockets close before it exits.
 */
#define _POSIX_C_SOURCE 200112L
#define _DEFAULT_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define WARMUP 1000L

static size_t size = 8;
static long iters = 20000;

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "tcplat: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* Reads exactly n bytes, spinning on a non-blocking recv. */
static void recv_all(int fd, char *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, buf + got, n - got, MSG_DONTWAIT);
        if (r > 0)
            got += (size_t)r;
        else if (r == 0) {
            fprintf(stderr, "tcplat: peer closed\n");
            exit(1);
        } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            die("recv");
    }
}

static void send_all(int fd, const char *buf, size_t n)
{
    size_t sent = 0;
    while (sent < n) {
        ssize_t r = send(fd, buf + sent, n - sent, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            die("send");
        }
        sent += (size_t)r;
    }
}

static void nodelay(int fd)
{
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0)
        die("TCP_NODELAY");
}

static void *server(void *arg)
{
    int fd = accept(*(int *)arg, NULL, NULL);
    if (fd < 0)
        die("accept");
    nodelay(fd);
    char *buf = malloc(size);
    if (!buf)
        die("malloc");
    for (long i = 0; i < WARMUP + iters; i++) {
        recv_all(fd, buf, size);
        send_all(fd, buf, size);
    }
    free(buf);
    close(fd);
    return NULL;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (argc > 1)
        size = strtoull(argv[1], NULL, 0);
    if (argc > 2)
        iters = strtol(argv[2], NULL, 0);
    if (size == 0 || size > (1 << 20) || iters <= 0) {
        fprintf(stderr, "usage: %s [SIZE_BYTES (1..1048576) [ITERS > 0]]\n", argv[0]);
        return 2;
    }
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    if (listener < 0)
        die("socket");
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(listener, 1) != 0 ||
        getsockname(listener, (struct sockaddr *)&addr, &len) != 0)
        die("listen on 127.0.0.1");
    pthread_t t;
    if (pthread_create(&t, NULL, server, &listener) != 0) {
        fprintf(stderr, "tcplat: cannot start the server thread\n");
        return 1;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0)
        die("connect");
    nodelay(fd);
    char *buf = calloc(1, size);
    double *rtt = malloc(sizeof(double) * (size_t)iters);
    if (!buf || !rtt)
        die("malloc");
    for (long i = 0; i < WARMUP + iters; i++) {
        double t0 = now_ns();
        send_all(fd, buf, size);
        recv_all(fd, buf, size);
        if (i >= WARMUP)
            rtt[i - WARMUP] = now_ns() - t0;
    }
    pthread_join(t, NULL);
    close(fd);
    close(listener);
    double sum = 0;
    for (long i = 0; i < iters; i++)
        sum += rtt[i];
    qsort(rtt, (size_t)iters, sizeof(double), cmp);
    printf("{\"size\":%zu,\"iters\":%ld,\"one_way_us\":{\"p50\":%.3f,\"mean\":%.3f}}\n", size, iters,
           rtt[iters / 2] / 2e3, sum / (double)iters / 2e3);
    free(rtt);
    free(buf);
    return 0;
}
