/*
 * kvm_smoke.c - the native backend of boxlite_syscheck.py.
 *
 * It decides nothing and knows no guest.  Python describes the whole test
 * as an array of operations (struct kvmsmoke_op): which ioctl to issue on
 * which descriptor, what to copy where, when to map the vCPU run area and
 * when to run the vCPU.  This file executes that array and reports where it
 * stopped; the pure-Python backend executes the very same array, so the
 * guests, the order of the steps and the interpretation of the result are
 * written once, in Python.
 *
 * Contract (mirrored by _PythonBackend in boxlite_syscheck.py):
 *   - every ioctl result is checked; the first failure stops the array and
 *     its step and errno are kept (unless the op is marked soft: then the
 *     negative errno is stored and the array goes on);
 *   - EINTR is retried for every ioctl but KVM_RUN, which is bounded: the
 *     calling thread blocks a real-time signal, a one-shot POSIX timer aimed
 *     at this thread (SIGEV_THREAD_ID) raises it after the bound, and
 *     KVM_SET_SIGNAL_MASK unblocks it only while the vCPU runs, so KVM_RUN
 *     returns EINTR.  The signal is consumed with sigtimedwait() while still
 *     blocked: no handler is installed, and the thread's mask is restored
 *     before returning;
 *   - descriptors the array creates live in struct kvmsmoke_state until
 *     kvmsmoke_release(), which the caller runs on every path.
 *
 * Kernel ABI: include/uapi/linux/kvm.h, Documentation/virt/kvm/api.rst.
 */
#define _GNU_SOURCE
#include <errno.h>
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

/* Bump when a structure below or a signature changes.  (Overridable only so
 * that the tests can build a library of another version.) */
#ifndef KVMSMOKE_ABI_VERSION
#define KVMSMOKE_ABI_VERSION 2
#endif

enum { OP_IOCTL = 1, OP_COPY = 2, OP_MAP_RUN = 3, OP_RUN = 4 };
enum { CHECK_NONE = 0, CHECK_EQ = 1, CHECK_GE = 2 };
enum { OPF_SOFT = 1 };
#define KVMSMOKE_FDS 4
#define KVMSMOKE_VALUES 16
#define KVMSMOKE_RUN_HEAD 288   /* kvm_run up to the end of its exit union */

struct kvmsmoke_op {
    int32_t step;        /* reported when this op fails */
    int32_t kind;        /* OP_* */
    int32_t fd;          /* descriptor slot the op acts on */
    int32_t fd_out;      /* OP_IOCTL: keep the result as this slot, or -1 */
    int32_t value_out;   /* keep the result (run: elapsed ns) here, or -1 */
    int32_t check;       /* OP_IOCTL: CHECK_* on the result */
    int32_t flags;       /* OPF_* */
    int32_t pad;
    int64_t check_value;
    uint64_t request;    /* OP_IOCTL: request; OP_RUN: bound in ns */
    uint64_t arg;        /* OP_IOCTL: argument; OP_COPY: destination;
                            OP_RUN: the timer signal */
    uint64_t src;        /* OP_COPY: source; OP_MAP_RUN: value slot of size */
    uint64_t len;        /* OP_COPY: bytes */
};

struct kvmsmoke_state {
    int32_t fds[KVMSMOKE_FDS];  /* slot 0 is the caller's /dev/kvm */
    uint64_t run_addr;
    uint64_t run_size;
};

struct kvmsmoke_result {
    int32_t step;        /* step of the op that failed, -1 when all ran */
    int32_t error;       /* errno at that step, 0 if none */
    int32_t op_index;    /* index of the op that failed or ran last */
    int32_t timed_out;   /* 1 when the bound stopped KVM_RUN */
    int32_t runs;        /* KVM_RUN calls, EINTR retries included */
    int32_t pad;
    int64_t values[KVMSMOKE_VALUES];
    uint8_t run_head[KVMSMOKE_RUN_HEAD];  /* kvm_run after the last run */
};

int kvmsmoke_abi_version(void) { return KVMSMOKE_ABI_VERSION; }

size_t kvmsmoke_sizes(int which)
{
    switch (which) {
    case 0: return sizeof(struct kvmsmoke_op);
    case 1: return sizeof(struct kvmsmoke_state);
    case 2: return sizeof(struct kvmsmoke_result);
    default: return 0;
    }
}

static int fail(struct kvmsmoke_result *out, int step, int err)
{
    out->step = step;
    out->error = err;
    return -1;
}

static long xioctl(int fd, unsigned long req, unsigned long arg)
{
    long ret;
    do {
        ret = ioctl(fd, req, arg);
    } while (ret < 0 && errno == EINTR);
    return ret;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Run the vCPU once, bounded by a timer signal.  Returns 0 or an errno. */
static int run_bounded(int vcpu, uint64_t bound_ns, int sig,
                       struct kvmsmoke_result *out, uint64_t *elapsed)
{
    sigset_t block, saved, only;
    int err, timer_id = -1, armed = 0;
    struct timespec zero = {0, 0};
    uint64_t start;

    sigemptyset(&block);
    sigaddset(&block, sig);
    err = pthread_sigmask(SIG_BLOCK, &block, &saved);
    if (err)
        return err;
    {
        /* struct kvm_signal_mask carries the kernel's 8-byte sigset. */
        union {
            struct kvm_signal_mask head;
            unsigned char bytes[sizeof(struct kvm_signal_mask) + 8];
        } kmask;
        sigset_t during = saved;
        sigdelset(&during, sig);
        kmask.head.len = 8;
        memcpy(kmask.head.sigset, &during, 8);
        if (xioctl(vcpu, KVM_SET_SIGNAL_MASK, (unsigned long)&kmask) < 0) {
            err = errno;
            goto out;
        }
    }
    struct sigevent sev;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = sig;
    sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
    if (syscall(SYS_timer_create, CLOCK_MONOTONIC, &sev, &timer_id) < 0) {
        err = errno;
        goto out;
    }
    armed = 1;
    struct itimerspec when = {
        .it_value = {(time_t)(bound_ns / 1000000000u),
                     (long)(bound_ns % 1000000000u)},
    };
    if (when.it_value.tv_sec == 0 && when.it_value.tv_nsec == 0)
        when.it_value.tv_nsec = 1;  /* zero would disarm the timer */
    if (syscall(SYS_timer_settime, timer_id, 0, &when, NULL) < 0) {
        err = errno;
        goto out;
    }
    sigemptyset(&only);
    sigaddset(&only, sig);
    start = now_ns();
    for (;;) {
        out->runs++;
        if (ioctl(vcpu, KVM_RUN, 0) == 0)
            break;
        if (errno != EINTR) {
            err = errno;
            break;
        }
        /* Ours means the bound passed; another signal was handled: go on. */
        if (sigtimedwait(&only, NULL, &zero) == sig) {
            out->timed_out = 1;
            break;
        }
    }
    *elapsed = now_ns() - start;
out:
    if (armed)
        syscall(SYS_timer_delete, timer_id);
    /* Drop a signal the timer raised after the run ended, then unblock. */
    while (sigtimedwait(&block, NULL, &zero) == sig)
        ;
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    return err;
}

static int exec_one(const struct kvmsmoke_op *op, struct kvmsmoke_state *st,
                    struct kvmsmoke_result *out)
{
    long ret;
    uint64_t elapsed = 0;
    int err;

    switch (op->kind) {
    case OP_IOCTL:
        ret = xioctl(st->fds[op->fd], (unsigned long)op->request,
                     (unsigned long)op->arg);
        if (ret < 0) {
            if (op->flags & OPF_SOFT) {
                if (op->value_out >= 0)
                    out->values[op->value_out] = -errno;
                return 0;
            }
            return fail(out, op->step, errno);
        }
        if (op->value_out >= 0)
            out->values[op->value_out] = ret;
        if (op->fd_out >= 0)
            st->fds[op->fd_out] = (int32_t)ret;  /* KVM sets O_CLOEXEC */
        if (op->check == CHECK_EQ && ret != op->check_value)
            return fail(out, op->step, 0);
        if (op->check == CHECK_GE && ret < op->check_value)
            return fail(out, op->step, EPROTO);
        return 0;
    case OP_COPY:
        memcpy((void *)(uintptr_t)op->arg, (const void *)(uintptr_t)op->src,
               (size_t)op->len);
        return 0;
    case OP_MAP_RUN: {
        size_t size = (size_t)out->values[op->src];
        void *run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED,
                         st->fds[op->fd], 0);
        if (run == MAP_FAILED)
            return fail(out, op->step, errno);
        st->run_addr = (uint64_t)(uintptr_t)run;
        st->run_size = size;
        return 0;
    }
    case OP_RUN:
        if (st->run_addr == 0)
            return fail(out, op->step, EFAULT);
        err = run_bounded(st->fds[op->fd], op->request, (int)op->arg, out,
                          &elapsed);
        memcpy(out->run_head, (const void *)(uintptr_t)st->run_addr,
               st->run_size < KVMSMOKE_RUN_HEAD ? st->run_size
                                                : KVMSMOKE_RUN_HEAD);
        if (op->value_out >= 0)
            out->values[op->value_out] = (int64_t)elapsed;
        if (err)
            return fail(out, op->step, err);
        if (out->timed_out)
            return fail(out, op->step, 0);
        return 0;
    default:
        return fail(out, op->step, EINVAL);
    }
}

/* Execute ops in order; stop at the first failure.  Returns 0 when all
 * ran, -1 when one failed (out->step, out->error, out->op_index say which). */
int kvmsmoke_exec(const struct kvmsmoke_op *ops, uint32_t count,
                  struct kvmsmoke_state *st, struct kvmsmoke_result *out)
{
    out->step = -1;
    out->error = 0;
    out->timed_out = 0;
    for (uint32_t i = 0; i < count; i++) {
        out->op_index = (int32_t)i;
        if (exec_one(&ops[i], st, out) < 0)
            return -1;
    }
    return 0;
}

/* Release what the ops created: the run area and every descriptor but the
 * caller's (slot 0).  Safe to call more than once. */
void kvmsmoke_release(struct kvmsmoke_state *st)
{
    if (st->run_addr) {
        munmap((void *)(uintptr_t)st->run_addr, (size_t)st->run_size);
        st->run_addr = 0;
        st->run_size = 0;
    }
    for (int i = KVMSMOKE_FDS - 1; i > 0; i--) {
        if (st->fds[i] >= 0) {
            close(st->fds[i]);
            st->fds[i] = -1;
        }
    }
}
