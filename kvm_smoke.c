/*
 * kvm_smoke.c - run a few instructions of real guest code under KVM.
 *
 * The native backend of boxlite_syscheck.py.  Python opens /dev/kvm and
 * passes the descriptor; this file builds a throwaway VM with one page of
 * guest memory, one vCPU in real mode, runs the given guest code once and
 * reports how far it got.  It decides nothing: the Python side turns the
 * result into a verdict, so both backends share one interpretation.
 *
 * Contract (mirrored by the pure-Python backend, see _py_smoke()):
 *   - every ioctl result is checked; the failing step and its errno are kept;
 *   - KVM_RUN is bounded: the calling thread blocks a real-time signal, a
 *     one-shot POSIX timer aimed at this thread (SIGEV_THREAD_ID) raises it
 *     after the bound, and KVM_SET_SIGNAL_MASK unblocks it only while the vCPU
 *     runs, so KVM_RUN returns EINTR.  The signal is then consumed with
 *     sigtimedwait() while still blocked: no handler is installed and the
 *     thread's mask is restored before returning;
 *   - every descriptor, mapping and timer is released on every path.
 *
 * Kernel ABI: include/uapi/linux/kvm.h, Documentation/virt/kvm/api.rst.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

/* Bump when struct kvmsmoke_result or a signature changes.  (Overridable
 * only so that the tests can build a library of another version.) */
#ifndef KVMSMOKE_ABI_VERSION
#define KVMSMOKE_ABI_VERSION 1
#endif

/* Steps, in order.  Python keeps the same numbers (_STEP_NAMES). */
enum {
    STEP_OPEN = 0,          /* done by the caller */
    STEP_API_VERSION = 1,
    STEP_CREATE_VM = 2,
    STEP_GUEST_MEMORY = 3,
    STEP_MEMORY_REGION = 4,
    STEP_CREATE_VCPU = 5,
    STEP_GET_SREGS = 6,
    STEP_SET_SREGS = 7,
    STEP_SET_REGS = 8,
    STEP_RUN_AREA_SIZE = 9,
    STEP_MAP_RUN_AREA = 10,
    STEP_ARM_TIMER = 11,
    STEP_RUN = 12,
    STEP_GET_REGS = 13,
    STEP_DONE = 14,
};

struct kvmsmoke_result {
    int32_t step;           /* failing step, or STEP_DONE */
    int32_t error;          /* errno at that step, 0 if none */
    int32_t api_version;    /* -1 until read */
    int32_t exit_reason;    /* -1 until KVM_RUN returned normally */
    uint64_t proof;         /* guest RAX after the exit */
    uint64_t hardware_entry_failure_reason; /* KVM_EXIT_FAIL_ENTRY */
    uint32_t fail_entry_cpu;                /* KVM_EXIT_FAIL_ENTRY */
    uint32_t internal_suberror;             /* KVM_EXIT_INTERNAL_ERROR */
    int32_t timed_out;      /* 1 when the bound stopped KVM_RUN */
    int32_t runs;           /* KVM_RUN calls, EINTR retries included */
};

int kvmsmoke_abi_version(void) { return KVMSMOKE_ABI_VERSION; }

size_t kvmsmoke_result_size(void) { return sizeof(struct kvmsmoke_result); }

static int fail(struct kvmsmoke_result *out, int step, int err)
{
    out->step = step;
    out->error = err;
    return step;
}

/* ioctl that retries on EINTR: only KVM_RUN has a reason to see signals. */
static int xioctl(int fd, unsigned long req, void *arg)
{
    int ret;
    do {
        ret = ioctl(fd, req, arg);
    } while (ret < 0 && errno == EINTR);
    return ret;
}

/* Run the vCPU until it exits for a reason other than a signal, or until
 * the timer signal says the bound has passed.  Returns 0 or an errno. */
static int run_bounded(int vcpu, struct kvm_run *run, int timer_signal,
                       struct kvmsmoke_result *out)
{
    sigset_t only_timer;
    struct timespec zero = {0, 0};

    sigemptyset(&only_timer);
    sigaddset(&only_timer, timer_signal);
    for (;;) {
        out->runs++;
        if (ioctl(vcpu, KVM_RUN, 0) == 0) {
            out->exit_reason = (int32_t)run->exit_reason;
            return 0;
        }
        if (errno != EINTR)
            return errno;
        /* A signal stopped the vCPU: ours means the bound passed; any other
         * one has been handled by its own handler, so run again. */
        if (sigtimedwait(&only_timer, NULL, &zero) == timer_signal) {
            out->timed_out = 1;
            return 0;
        }
    }
}

int kvmsmoke_run(int kvm_fd, const uint8_t *code, size_t code_len,
                 uint64_t timeout_ns, int timer_signal,
                 struct kvmsmoke_result *out)
{
    int vm = -1, vcpu = -1, ret, err, timer_armed = 0, mask_changed = 0;
    long page = sysconf(_SC_PAGESIZE);
    void *mem = MAP_FAILED;
    struct kvm_run *run = MAP_FAILED;
    size_t run_size = 0;
    sigset_t block, saved;
    int timer_id = -1;  /* the kernel's timer id (__kernel_timer_t) */
    struct kvm_sregs sregs;
    struct kvm_regs regs;

    memset(out, 0, sizeof(*out));
    out->api_version = -1;
    out->exit_reason = -1;
    if (page <= 0 || code_len == 0 || code_len > (size_t)page)
        return fail(out, STEP_GUEST_MEMORY, EINVAL);

    /* The kernel returns the version itself (or -1 with errno). */
    ret = xioctl(kvm_fd, KVM_GET_API_VERSION, 0);
    if (ret < 0)
        return fail(out, STEP_API_VERSION, errno);
    out->api_version = ret;
    if (ret != KVM_API_VERSION)
        return fail(out, STEP_API_VERSION, 0);

    vm = xioctl(kvm_fd, KVM_CREATE_VM, 0);
    if (vm < 0) {
        fail(out, STEP_CREATE_VM, errno);
        goto out;
    }
    /* KVM returns its descriptors with O_CLOEXEC already set. */

    mem = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
        fail(out, STEP_GUEST_MEMORY, errno);
        goto out;
    }
    memcpy(mem, code, code_len);

    struct kvm_userspace_memory_region region = {
        .slot = 0,
        .guest_phys_addr = 0,
        .memory_size = (uint64_t)page,
        .userspace_addr = (uint64_t)(uintptr_t)mem,
    };
    if (xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) {
        fail(out, STEP_MEMORY_REGION, errno);
        goto out;
    }

    vcpu = xioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) {
        fail(out, STEP_CREATE_VCPU, errno);
        goto out;
    }

    if (xioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) {
        fail(out, STEP_GET_SREGS, errno);
        goto out;
    }
    /* Real mode, code at guest physical address 0. */
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (xioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) {
        fail(out, STEP_SET_SREGS, errno);
        goto out;
    }
    memset(&regs, 0, sizeof(regs));
    regs.rip = 0;
    regs.rflags = 0x2;  /* bit 1 is reserved and must be set */
    if (xioctl(vcpu, KVM_SET_REGS, &regs) < 0) {
        fail(out, STEP_SET_REGS, errno);
        goto out;
    }

    ret = xioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (ret < 0) {
        fail(out, STEP_RUN_AREA_SIZE, errno);
        goto out;
    }
    if ((size_t)ret < sizeof(struct kvm_run)) {
        fail(out, STEP_RUN_AREA_SIZE, EPROTO);
        goto out;
    }
    run_size = (size_t)ret;
    run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) {
        fail(out, STEP_MAP_RUN_AREA, errno);
        goto out;
    }

    /* Block the timer signal in this thread; the vCPU sees it unblocked. */
    sigemptyset(&block);
    sigaddset(&block, timer_signal);
    err = pthread_sigmask(SIG_BLOCK, &block, &saved);
    if (err) {
        fail(out, STEP_ARM_TIMER, err);
        goto out;
    }
    mask_changed = 1;
    {
        /* struct kvm_signal_mask carries the kernel's 8-byte sigset. */
        union {
            struct kvm_signal_mask head;
            unsigned char bytes[sizeof(struct kvm_signal_mask) + 8];
        } kmask;
        sigset_t during_run = saved;
        sigdelset(&during_run, timer_signal);
        kmask.head.len = 8;
        memcpy(kmask.head.sigset, &during_run, 8);
        if (xioctl(vcpu, KVM_SET_SIGNAL_MASK, &kmask) < 0) {
            fail(out, STEP_ARM_TIMER, errno);
            goto out;
        }
    }
    struct sigevent sev;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = timer_signal;
    sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
    if (syscall(SYS_timer_create, CLOCK_MONOTONIC, &sev, &timer_id) < 0) {
        fail(out, STEP_ARM_TIMER, errno);
        goto out;
    }
    timer_armed = 1;
    struct itimerspec when = {
        .it_value = {(time_t)(timeout_ns / 1000000000u),
                     (long)(timeout_ns % 1000000000u)},
    };
    if (when.it_value.tv_sec == 0 && when.it_value.tv_nsec == 0)
        when.it_value.tv_nsec = 1;  /* zero would disarm the timer */
    if (syscall(SYS_timer_settime, timer_id, 0, &when, NULL) < 0) {
        fail(out, STEP_ARM_TIMER, errno);
        goto out;
    }

    err = run_bounded(vcpu, run, timer_signal, out);
    if (err) {
        fail(out, STEP_RUN, err);
        goto out;
    }
    if (out->timed_out) {
        fail(out, STEP_RUN, 0);
        goto out;
    }
    if (run->exit_reason == KVM_EXIT_FAIL_ENTRY) {
        out->hardware_entry_failure_reason =
            run->fail_entry.hardware_entry_failure_reason;
        out->fail_entry_cpu = run->fail_entry.cpu;
    } else if (run->exit_reason == KVM_EXIT_INTERNAL_ERROR) {
        out->internal_suberror = run->internal.suberror;
    }

    if (xioctl(vcpu, KVM_GET_REGS, &regs) < 0) {
        fail(out, STEP_GET_REGS, errno);
        goto out;
    }
    out->proof = regs.rax;
    fail(out, STEP_DONE, 0);

out:
    if (timer_armed)
        syscall(SYS_timer_delete, timer_id);
    if (mask_changed) {
        /* Drop a signal the timer raised after the run ended, then unblock. */
        struct timespec zero = {0, 0};
        while (sigtimedwait(&block, NULL, &zero) == timer_signal)
            ;
        pthread_sigmask(SIG_SETMASK, &saved, NULL);
    }
    if (run != MAP_FAILED)
        munmap(run, run_size);
    if (vcpu >= 0)
        close(vcpu);
    if (mem != MAP_FAILED)
        munmap(mem, (size_t)page);
    if (vm >= 0)
        close(vm);
    return out->step;
}
