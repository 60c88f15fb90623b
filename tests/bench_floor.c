/* The C floor of the bare device check (`make bench`, and inside the nested
 * SVM host): open /dev/kvm, read the API version, create a VM with one page,
 * one real-mode vCPU running "mov eax, imm32; hlt", arm a one-shot timer as
 * the gate does, run it, read RAX, close (the VM's teardown, the last
 * unmap, off the clock, as the check leaves it to a thread).  N times; prints one duration in
 * nanoseconds per line.  Raw ioctls only: it does not use libkvmsmoke.so, so
 * it measures what any C program would pay for the same work. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }

#include "floor_bound.h"

static struct kvm_run *pending; /* the last pass's run area, not yet unmapped */
static size_t pending_size;

static void once(void)
{
    static const uint8_t guest[] = {0x66, 0xb8, 0x7e, 0x11, 0xc5, 0xb0, 0xf4};
    /* An earlier pass's VM still alive would make this one's cheaper: KVM
     * enables virtualization on every CPU only for a first VM. */
    if (pending != NULL) die("the last pass was not settled");
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("open /dev/kvm");
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != 12) die("KVM_GET_API_VERSION");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    void *mem = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    memcpy(mem, guest, sizeof(guest));
    struct kvm_userspace_memory_region region = {
        .memory_size = 4096, .userspace_addr = (uint64_t)(uintptr_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("region");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = 0, .rflags = 2};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
    int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap run");
    floor_bounded_run(vcpu, 2000000000LL); /* the bound, as the gate arms it */
    if (run->exit_reason != KVM_EXIT_HLT) die("exit");
    if (ioctl(vcpu, KVM_GET_REGS, &regs) < 0 || (uint32_t)regs.rax != 0xb0c5117e) die("proof");
    /* The VM's teardown is left for later, as the check leaves it to its
     * releasing thread: the run area holds the vCPU, and through it the VM,
     * after the descriptors close; settle() unmaps it, off the clock. */
    if (madvise(run, (size_t)size, MADV_DONTFORK) != 0) die("madvise");
    if (close(vcpu) != 0 || close(vm) != 0) die("close");
    if (munmap(mem, 4096) != 0) die("munmap");
    close(kvm);
    pending = run;
    pending_size = (size_t)size;
}

static void settle(void)
{
    if (pending != NULL && munmap(pending, pending_size) != 0) die("munmap run");
    pending = NULL;
}

/* The same work, for make bench to call from inside the interpreter
 * (built once more with -shared -Dmain=bench_floor_main): what the check
 * costs there less this is ours; this less the program's own run is what
 * the interpreter's process costs the kernel's calls. */
void bench_floor_once(void) { once(); }

/* The last pass's VM teardown, for make bench to run off its clock as it
 * waits for the check's releasing thread. */
void bench_floor_settle(void) { settle(); }

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 1000;
    struct timespec a, b;
    for (int i = 0; i < n; i++) {
        clock_gettime(CLOCK_MONOTONIC, &a);
        once();
        clock_gettime(CLOCK_MONOTONIC, &b);
        settle();
        printf("%lld\n", (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
    }
    return 0;
}
