/* bench/memcpy.c: single-thread memcpy bandwidth, the baseline that
 * bench/compare.sh puts next to chanio's shm one-sided write (pingpong
 * --transport shm --mode write --size 1MiB).
 *
 *   cc -O2 -o memcpy bench/memcpy.c && ./memcpy [SIZE_BYTES [ITERS [SET_BYTES]]]
 *
 * Allocates a source and a destination area of SET bytes each (default:
 * SIZE, i.e. one buffer, cache-hot when it fits), touches every page of
 * both, copies SIZE bytes (default 1 MiB) ITERS times (default 10000) on one
 * thread, each copy from the next SIZE-byte chunk of the source area to the
 * next of the destination area (with SET well above the last-level cache,
 * every copy is cache-cold, as a stream through many buffers is), timed
 * with clock_gettime(CLOCK_MONOTONIC), and prints one JSON line:
 * {"size":..,"iters":..,"set":..,"seconds":..,"mbps":..} with MB/s = 10^6
 * bytes/s of data copied. A byte of the destination is read
 * into a volatile sink after every copy, and one source byte changes before
 * it, so the compiler can neither drop nor hoist the copies.
 */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static volatile unsigned char sink;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    size_t size = argc > 1 ? strtoull(argv[1], NULL, 0) : (size_t)1 << 20;
    long iters = argc > 2 ? strtol(argv[2], NULL, 0) : 10000;
    size_t set = argc > 3 ? strtoull(argv[3], NULL, 0) : size;
    if (size == 0 || iters <= 0 || set < size) {
        fprintf(stderr, "usage: %s [SIZE_BYTES [ITERS [SET_BYTES >= SIZE]]]\n", argv[0]);
        return 2;
    }
    size_t chunks = set / size;
    set = chunks * size;
    unsigned char *src = malloc(set), *dst = malloc(set);
    if (!src || !dst) {
        fprintf(stderr, "memcpy: cannot allocate 2 x %zu bytes\n", set);
        return 1;
    }
    /* touch both areas so page faults stay out of the timing */
    for (size_t i = 0; i < set; i++)
        src[i] = (unsigned char)i;
    memset(dst, 0, set);
    /* warm-up: a tenth of the copies, at least one */
    for (long i = 0; i < iters / 10 + 1; i++) {
        size_t at = ((size_t)i % chunks) * size;
        src[at + (size_t)i % size] ^= 1;
        memcpy(dst + at, src + at, size);
        sink = dst[at + (size_t)i % size];
    }
    double t0 = now();
    for (long i = 0; i < iters; i++) {
        size_t at = ((size_t)i % chunks) * size;
        src[at + (size_t)i % size] ^= 1;
        memcpy(dst + at, src + at, size);
        sink = dst[at + (size_t)(i * 4099) % size];
#ifdef __GNUC__
        __asm__ __volatile__("" ::: "memory");
#endif
    }
    double secs = now() - t0;
    if (secs <= 0) {
        fprintf(stderr, "memcpy: clock did not advance\n");
        return 1;
    }
    printf("{\"size\":%zu,\"iters\":%ld,\"set\":%zu,\"seconds\":%.6f,\"mbps\":%.1f}\n",
           size, iters, set, secs, (double)size * (double)iters / secs / 1e6);
    free(src);
    free(dst);
    return 0;
}
