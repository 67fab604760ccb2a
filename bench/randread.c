/*
 * randread PATH READERS COUNT SEED
 *
 * COUNT preads of 4 KiB at offsets drawn from SEED (xorshift64*, 4 KiB aligned,
 * uniform over the file's size), shared by READERS threads, each with its own open()
 * of PATH and one read in flight (queue depth 1 per reader). The offsets depend only on
 * SEED and the file size, so every target of the same size gets the same reads.
 * Prints the reads per second (COUNT / wall time).
 *
 * Built by bench/run with `cc -O2 -pthread`.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define MAX_READERS 64

static const char *path;
static uint64_t *offsets;
static long count;
static long next_index; /* shared, taken with __atomic_fetch_add */

static void *reader(void *arg)
{
    (void)arg;
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        perror(path);
        exit(1);
    }
    posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
    char *buf = aligned_alloc(BLOCK, BLOCK);
    for (;;) {
        long i = __atomic_fetch_add(&next_index, 1, __ATOMIC_RELAXED);
        if (i >= count)
            break;
        if (pread(fd, buf, BLOCK, (off_t)offsets[i]) < 0) {
            perror("pread");
            exit(1);
        }
    }
    free(buf);
    close(fd);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: randread PATH READERS COUNT SEED\n");
        return 2;
    }
    path = argv[1];
    int readers = atoi(argv[2]);
    count = atol(argv[3]);
    uint64_t x = strtoull(argv[4], NULL, 0) | 1;
    if (readers < 1 || readers > MAX_READERS || count < 1) {
        fprintf(stderr, "randread: READERS must be 1..%d and COUNT positive\n", MAX_READERS);
        return 2;
    }
    struct stat st;
    if (stat(path, &st) != 0 || st.st_size < BLOCK) {
        perror(path);
        return 1;
    }
    uint64_t blocks = (uint64_t)st.st_size / BLOCK;
    offsets = malloc(sizeof(uint64_t) * (size_t)count);
    if (!offsets)
        return 1;
    for (long i = 0; i < count; i++) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        offsets[i] = ((x * 0x2545F4914F6CDD1DULL) % blocks) * BLOCK;
    }
    pthread_t t[MAX_READERS];
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < readers; i++)
        pthread_create(&t[i], NULL, reader, NULL);
    for (int i = 0; i < readers; i++)
        pthread_join(t[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) / 1e9;
    printf("%.0f\n", (double)count / s);
    return 0;
}
