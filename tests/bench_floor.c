/* The floor for `make bench`: open /dev/kvm, run the smoke test, close,
 * N times, from C; prints one duration in nanoseconds per line. */
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

struct kvmsmoke_result { int32_t s[4]; uint64_t u[3]; uint32_t w[2]; int32_t t[2]; };
int kvmsmoke_run(int, const uint8_t *, size_t, uint64_t, int, struct kvmsmoke_result *);

int main(int argc, char **argv)
{
    static const uint8_t guest[] = {0x66, 0xb8, 0x7e, 0x11, 0xc5, 0xb0, 0xf4};
    int n = argc > 1 ? atoi(argv[1]) : 1000;
    struct kvmsmoke_result out;
    struct timespec a, b;

    for (int i = 0; i < n; i++) {
        clock_gettime(CLOCK_MONOTONIC, &a);
        int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
        if (fd < 0) { perror("open /dev/kvm"); return 1; }
        if (kvmsmoke_run(fd, guest, sizeof(guest), 2000000000u, SIGRTMAX - 1, &out) != 14
            || out.u[0] != 0xb0c5117e) {
            fprintf(stderr, "smoke test failed at step %d\n", out.s[0]);
            return 1;
        }
        close(fd);
        clock_gettime(CLOCK_MONOTONIC, &b);
        printf("%lld\n", (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
    }
    return 0;
}
