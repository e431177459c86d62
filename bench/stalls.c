/* bench/stalls.c: how often this machine takes the CPU away from a thread
 * that never sleeps, the noise under every latency figure of
 * bench/compare.sh (interrupts, the hypervisor, other tenants).
 *
 *   cc -O2 -o stalls bench/stalls.c && ./stalls [SECONDS]
 *
 * One thread reads CLOCK_MONOTONIC in a tight loop for SECONDS (default 2)
 * and counts every gap of more than 1 us between two reads: a stall, since
 * a read takes some 20 ns. It prints one JSON line {"seconds":..,
 * "stalls":..,"every_us":..,"stalled_pct":..,"p50_us":..,"max_us":..}: the
 * number of stalls, the mean time between them, the share of the run lost
 * to them, and the median and largest stall. A polling thread (chanio's
 * spinning waiters, a spinning benchmark) loses the same.
 */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define MAX_STALLS 1000000

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? strtod(argv[1], NULL) : 2.0;
    if (!(seconds > 0 && seconds <= 3600)) {
        fprintf(stderr, "usage: %s [SECONDS (0..3600]]\n", argv[0]);
        return 2;
    }
    double *gaps = malloc(sizeof(double) * MAX_STALLS);
    if (!gaps) {
        fprintf(stderr, "stalls: out of memory\n");
        return 1;
    }
    long n = 0;
    double lost = 0, start = now_ns(), last = start, end = start + seconds * 1e9;
    for (;;) {
        double t = now_ns();
        double gap = t - last;
        last = t;
        if (gap > 1000) {
            lost += gap;
            if (n < MAX_STALLS)
                gaps[n] = gap;
            n++;
        }
        if (t >= end)
            break;
    }
    double elapsed = last - start;
    long kept = n < MAX_STALLS ? n : MAX_STALLS;
    qsort(gaps, (size_t)kept, sizeof(double), cmp);
    printf("{\"seconds\":%.3f,\"stalls\":%ld,\"every_us\":%.1f,\"stalled_pct\":%.2f,\"p50_us\":%.2f,\"max_us\":%.1f}\n",
           elapsed / 1e9, n, n ? elapsed / (double)n / 1e3 : 0.0, 100.0 * lost / elapsed,
           kept ? gaps[kept / 2] / 1e3 : 0.0, kept ? gaps[kept - 1] / 1e3 : 0.0);
    free(gaps);
    return 0;
}
