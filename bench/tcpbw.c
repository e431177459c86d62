/* bench/tcpbw.c: plain TCP streaming over 127.0.0.1, the kernel floor that
 * bench/compare.sh puts next to chanio's tcp 1 MiB stream (pingpong
 * --transport tcp --mode push --zero-copy --size 1MiB).
 *
 *   cc -O2 -pthread -o tcpbw bench/tcpbw.c && ./tcpbw [SIZE_BYTES [COUNT [READ_BYTES [untouched]]]]
 *
 * One thread writes COUNT messages of SIZE bytes (default 2000 x 1 MiB)
 * from one touched buffer with blocking write(2) on a TCP_NODELAY socket;
 * with "untouched", from a fresh anonymous mapping never written to, whose
 * pages are all the kernel's shared zero page (one 4 KiB page, always in
 * cache: the copy into the socket reads nothing from memory). That is how
 * ucx_perftest sends: its send buffer is never written (during a ucp_am_bw
 * run 328 KiB of the 3.7 MiB anonymous mapping holding its buffers were
 * resident, and it sends zeros), so this variant
 * shows how much of a peer's figure that alone explains;
 * another thread reads them with blocking read(2) of at most READ_BYTES
 * (default SIZE) into one touched buffer of SIZE bytes, as a receiver that
 * places each message in its own memory must. Nothing else happens: no
 * framing, no acknowledgements, no completions. It prints one JSON line
 * {"size":..,"count":..,"read":..,"seconds":..,"mbps":..} with MB/s = 10^6
 * bytes/s received, timed from the first write to the last byte read.
 * The listener binds 127.0.0.1 on a port the kernel picks, and both
 * sockets close before it exits.
 */
#define _POSIX_C_SOURCE 200112L
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct rx {
    int listener;
    size_t size, read, total, got;
    double done;
    int failed;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void *receive(void *arg)
{
    struct rx *rx = arg;
    int fd = accept(rx->listener, NULL, NULL);
    unsigned char *buf = malloc(rx->size);
    if (fd < 0 || !buf) {
        rx->failed = 1;
        free(buf);
        return NULL;
    }
    memset(buf, 0, rx->size);
    size_t at = 0; /* where the current message continues in buf */
    while (rx->got < rx->total) {
        size_t want = rx->size - at < rx->read ? rx->size - at : rx->read;
        ssize_t n = read(fd, buf + at, want);
        if (n <= 0) {
            rx->failed = 1;
            break;
        }
        rx->got += (size_t)n;
        at = (at + (size_t)n) % rx->size;
    }
    rx->done = now();
    close(fd);
    free(buf);
    return NULL;
}

int main(int argc, char **argv)
{
    size_t size = argc > 1 ? strtoull(argv[1], NULL, 0) : (size_t)1 << 20;
    long count = argc > 2 ? strtol(argv[2], NULL, 0) : 2000;
    size_t readsz = argc > 3 ? strtoull(argv[3], NULL, 0) : size;
    int untouched = argc > 4 && strcmp(argv[4], "untouched") == 0;
    if (size == 0 || count <= 0 || readsz == 0 || (argc > 4 && !untouched)) {
        fprintf(stderr, "usage: %s [SIZE_BYTES [COUNT [READ_BYTES [untouched]]]]\n", argv[0]);
        return 2;
    }
    struct rx rx = {.size = size, .read = readsz, .total = size * (size_t)count};
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof addr;
    rx.listener = socket(AF_INET, SOCK_STREAM, 0);
    if (rx.listener < 0 || bind(rx.listener, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        listen(rx.listener, 1) != 0 || getsockname(rx.listener, (struct sockaddr *)&addr, &alen) != 0) {
        perror("tcpbw: listen on 127.0.0.1");
        return 1;
    }
    pthread_t thread;
    if (pthread_create(&thread, NULL, receive, &rx) != 0) {
        fprintf(stderr, "tcpbw: cannot start the receiving thread\n");
        return 1;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    unsigned char *buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) {
        perror("tcpbw: mmap");
        return 1;
    }
    if (fd < 0 || setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0 ||
        connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("tcpbw: connect to 127.0.0.1");
        return 1;
    }
    if (!untouched)
        memset(buf, 1, size);
    double start = now();
    for (long i = 0; i < count; i++) {
        size_t off = 0;
        while (off < size) {
            ssize_t n = write(fd, buf + off, size - off);
            if (n <= 0) {
                perror("tcpbw: write");
                return 1;
            }
            off += (size_t)n;
        }
    }
    pthread_join(thread, NULL);
    close(fd);
    close(rx.listener);
    munmap(buf, size);
    if (rx.failed || rx.got != rx.total) {
        fprintf(stderr, "tcpbw: received %zu of %zu bytes\n", rx.got, rx.total);
        return 1;
    }
    double seconds = rx.done - start;
    printf("{\"size\":%zu,\"count\":%ld,\"read\":%zu,\"seconds\":%.6f,\"mbps\":%.1f}\n", size, count, readsz,
           seconds, (double)rx.total / seconds / 1e6);
    return 0;
}
