/*
 * kvm_smoke.c - the native backend of boxlite_syscheck.py.
 *
 * It decides nothing and knows no guest.  Python describes the whole test
 * as an array of operations (struct kvmsmoke_op): which ioctl to issue on
 * which descriptor, what to copy where, when to map the vCPU run area,
 * when to run the vCPU, and where the array ends early unless a difference
 * of run times lies within bounds (OP_UNLESS: the speed probe's decisions,
 * made in Python's numbers).  This file executes that array and reports
 * where it stopped; the pure-Python backend executes the very same array, so the
 * guests, the order of the steps and the interpretation of the result are
 * written once, in Python.
 *
 * Contract (mirrored by _PythonBackend in boxlite_syscheck.py):
 *   - every ioctl result is checked; the first failure stops the array and
 *     its step and errno are kept (unless the op is marked soft: then the
 *     negative errno is stored and the array goes on);
 *   - EINTR is retried, with every signal blocked and for 200 ms at most,
 *     for every ioctl but KVM_RUN, which is bounded in time: the calling thread blocks a
 *     real-time signal, and KVM_SET_SIGNAL_MASK unblocks it only while the
 *     vCPU runs, so KVM_RUN returns EINTR when it arrives.  It is raised at
 *     the run's deadline by a one-shot POSIX timer aimed at this thread
 *     (SIGEV_THREAD_ID), whose signal carries a cookie in si_value: only
 *     ours ends the run.  Where no timer can be had (RLIMIT_SIGPENDING 0:
 *     the kernel cannot queue a real-time signal), a watchdog thread raises
 *     SIGSTKFLT, a classic signal Linux never sends itself, with tgkill():
 *     a classic signal is marked pending even when no queue entry can be
 *     allocated.  It carries no cookie; the watchdog says "fired" before it
 *     sends, and an instance that arrives unannounced is someone else's.
 *     Where neither can be had, the run is unbounded and says so.  A signal
 *     of our numbers raised by anyone else is set aside and raised again,
 *     as it was, after the run;
 *     any other signal returns to the caller at once (its handler may need
 *     to run, e.g. KeyboardInterrupt), and the caller resumes the same op
 *     with the same deadline.  No handler is installed, and the thread's
 *     mask is restored before returning;
 *   - descriptors the array creates live in struct kvmsmoke_state until
 *     kvmsmoke_release(), which the caller runs on every path.
 *
 * Kernel ABI: include/uapi/linux/kvm.h, Documentation/virt/kvm/api.rst.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/kvm.h>
#include <pthread.h>
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
#define KVMSMOKE_ABI_VERSION 7
#endif

enum { OP_IOCTL = 1, OP_COPY = 2, OP_MAP_RUN = 3, OP_RUN = 4, OP_UNLESS = 5 };
enum { CHECK_NONE = 0, CHECK_EQ = 1, CHECK_GE = 2 };
enum { OPF_SOFT = 1 };
/* Descriptors: /dev/kvm, the guest's VM and vCPU, and two more VMs (the
 * gate's start-up ioctls, made in the guest's first array). */
#define KVMSMOKE_FDS 5
#define KVMSMOKE_VALUES 27
#define KVMSMOKE_RUN_HEAD 288   /* kvm_run up to the end of its exit union */
#define KVMSMOKE_EINTR_RETRY_NS 200000000ull  /* 200 ms, as _EINTR_RETRY_NS */
#define KVMSMOKE_STASH 8        /* foreign signals of our number set aside */

struct kvmsmoke_op {
    int32_t step;        /* reported when this op fails */
    int32_t kind;        /* OP_* */
    int32_t fd;          /* descriptor slot the op acts on */
    int32_t fd_out;      /* OP_IOCTL: keep the result as this slot, or -1 */
    int32_t value_out;   /* keep the result (run: the thread's CPU ns) here, or -1 */
    int32_t check;       /* OP_IOCTL: CHECK_* on the result */
    int32_t flags;       /* OPF_* */
    int32_t pad;
    int64_t check_value;
    uint64_t request;    /* OP_IOCTL: request; OP_RUN: bound in ns;
                            OP_UNLESS: six value slots, a byte each */
    uint64_t arg;        /* OP_IOCTL: argument; OP_COPY: destination;
                            OP_RUN: the timer signal */
    uint64_t src;        /* OP_COPY: source; OP_MAP_RUN: value slot of size;
                            OP_RUN: the cookie its signals carry */
    uint64_t len;        /* OP_COPY: bytes */
};

struct kvmsmoke_state {
    int32_t fds[KVMSMOKE_FDS];  /* slot 0 is the caller's /dev/kvm */
    uint64_t run_addr;
    uint64_t run_size;
    uint64_t deadline_ns;  /* CLOCK_MONOTONIC deadline of the run under way */
};

/* How a run was bounded. */
enum { BOUND_TIMER = 1, BOUND_WATCHDOG = 2, BOUND_NONE = 3 };

struct kvmsmoke_result {
    int32_t step;        /* step of the op that failed, -1 when all ran */
    int32_t error;       /* errno at that step, 0 if none */
    int32_t op_index;    /* index of the op that failed or ran last */
    int32_t timed_out;   /* 1 when the bound stopped KVM_RUN */
    int32_t runs;        /* KVM_RUN calls, EINTR retries included */
    int32_t interrupted; /* 1: another signal arrived; resume at op_index */
    int32_t bound;       /* BOUND_* of the last run */
    int32_t bound_error; /* errno of the bound that could not be had */
    int32_t requeued;    /* foreign signals of our number queued again */
    int32_t stopped;     /* 1 when an OP_UNLESS ended the array, all ran */
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

/* One clock's reading in ns; -1 when the clock is refused. */
static int read_ns(clockid_t clock, uint64_t *ns)
{
    struct timespec ts;
    if (clock_gettime(clock, &ts) != 0)
        return -1;
    *ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    return 0;
}

static uint64_t now_ns(void)
{
    uint64_t ns = 0;
    read_ns(CLOCK_MONOTONIC, &ns);  /* read in the vDSO: it does not fail */
    return ns;
}

/* The clock a run is timed on, and its first reading: the thread's CPU
 * time (guest time counts as the thread's), so that a task or a thread of
 * ours that takes the CPU in the middle of the run, on a host with one
 * CPU, is not charged to the guest.  Where that clock is refused (a
 * seccomp policy can refuse it), CLOCK_MONOTONIC. */
static clockid_t run_clock(uint64_t *start)
{
    if (read_ns(CLOCK_THREAD_CPUTIME_ID, start) == 0)
        return CLOCK_THREAD_CPUTIME_ID;
    *start = now_ns();
    return CLOCK_MONOTONIC;
}

/* ioctl(2), for every request but KVM_RUN.  A call a signal interrupted is
 * retried with every signal blocked, so a caller's fast interval timer
 * cannot starve it (its signals wait and arrive when the mask is restored),
 * for KVMSMOKE_EINTR_RETRY_NS at most: a policy that answers EINTR forever
 * must not hang the check.  errno is that of the last attempt. */
static long xioctl(int fd, unsigned long req, unsigned long arg)
{
    long ret = ioctl(fd, req, arg);
    if (ret >= 0 || errno != EINTR)
        return ret;
    sigset_t all, saved;
    sigfillset(&all);
    if (pthread_sigmask(SIG_BLOCK, &all, &saved) != 0)
        return ret;
    uint64_t deadline = now_ns() + KVMSMOKE_EINTR_RETRY_NS;
    int err;
    do {
        ret = ioctl(fd, req, arg);
        err = errno;
    } while (ret < 0 && err == EINTR && now_ns() < deadline);
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    errno = err;
    return ret;
}

#define WATCHDOG_SIGNAL SIGSTKFLT

struct watchdog {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int stop;
    int fired;          /* set before the signal is sent */
    pid_t pid, tid;
    uint64_t deadline_ns;
};

/* Raise WATCHDOG_SIGNAL in the vCPU thread at the deadline, unless told to
 * stop first. */
static void *watch(void *arg)
{
    struct watchdog *w = arg;
    struct timespec until = {(time_t)(w->deadline_ns / 1000000000u),
                             (long)(w->deadline_ns % 1000000000u)};
    int due = 0;

    pthread_mutex_lock(&w->lock);
    while (!w->stop && !due) {
        if (pthread_cond_timedwait(&w->wake, &w->lock, &until) == ETIMEDOUT)
            due = 1;
    }
    if (due && !w->stop) {
        __atomic_store_n(&w->fired, 1, __ATOMIC_SEQ_CST);
        syscall(SYS_tgkill, w->pid, w->tid, WATCHDOG_SIGNAL);
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

/* Take a pending WATCHDOG_SIGNAL: returns 1 when it was the watchdog's,
 * and notes in *theirs one that was someone else's. */
static int take_watchdog(struct watchdog *w, int *theirs)
{
    sigset_t only;
    struct timespec zero = {0, 0};

    sigemptyset(&only);
    sigaddset(&only, WATCHDOG_SIGNAL);
    if (sigtimedwait(&only, NULL, &zero) != WATCHDOG_SIGNAL)
        return 0;
    if (w && __atomic_load_n(&w->fired, __ATOMIC_SEQ_CST))
        return 1;
    *theirs = 1;
    return 0;
}

static int set_kvm_mask(int vcpu, const sigset_t *saved, int sig, int watchdog)
{
    /* struct kvm_signal_mask carries the kernel's 8-byte sigset. */
    union {
        struct kvm_signal_mask head;
        unsigned char bytes[sizeof(struct kvm_signal_mask) + 8];
    } kmask;
    sigset_t during = *saved;
    sigdelset(&during, sig);
    if (watchdog)
        sigdelset(&during, WATCHDOG_SIGNAL);
    kmask.head.len = 8;
    memcpy(kmask.head.sigset, &during, 8);
    return xioctl(vcpu, KVM_SET_SIGNAL_MASK, (unsigned long)&kmask) < 0 ? errno : 0;
}

static int ours(const siginfo_t *info, uint64_t cookie)
{
    return (uint64_t)(uintptr_t)info->si_value.sival_ptr == cookie &&
           (info->si_code == SI_TIMER || info->si_code == SI_USER);
}

/* Take pending instances of our signal: ours say the bound passed, others
 * are set aside to be queued again.  Returns 1 when ours was among them. */
static int take_pending(const sigset_t *only, int sig, uint64_t cookie,
                        siginfo_t *stash, int *stashed)
{
    struct timespec zero = {0, 0};
    siginfo_t info;
    int mine = 0;

    while (sigtimedwait(only, &info, &zero) == sig) {
        if (ours(&info, cookie))
            mine = 1;
        else if (*stashed < KVMSMOKE_STASH)
            stash[(*stashed)++] = info;
    }
    return mine;
}

/* Run the vCPU once, bounded as the header says.  Returns 0 or an errno;
 * *arming is set when the bound could not be armed at all. */
static int run_bounded(int vcpu, struct kvmsmoke_state *st, uint64_t bound_ns,
                       int sig, uint64_t cookie, struct kvmsmoke_result *out,
                       uint64_t *elapsed, int *arming)
{
    sigset_t block, saved, both;
    siginfo_t stash[KVMSMOKE_STASH];
    int err = 0, stashed = 0, timer_id = -1, armed = 0, watching = 0;
    int theirs_classic = 0;
    struct watchdog w;
    pthread_t watcher;
    uint64_t start, end;
    clockid_t clock;

    *arming = 0;
    if (st->deadline_ns == 0)
        st->deadline_ns = now_ns() + bound_ns;
    sigemptyset(&block);
    sigaddset(&block, sig);
    err = pthread_sigmask(SIG_BLOCK, &block, &saved);
    if (err) {
        *arming = 1;
        return err;
    }
    /* An instance already pending (someone else's) would stop KVM_RUN at
     * once: set it aside before the run. */
    take_pending(&block, sig, cookie, stash, &stashed);
    err = set_kvm_mask(vcpu, &saved, sig, 0);
    if (err) {
        *arming = 1;
        goto out;
    }
    struct sigevent sev;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = sig;
    sev.sigev_value.sival_ptr = (void *)(uintptr_t)cookie;
    sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
    if (syscall(SYS_timer_create, CLOCK_MONOTONIC, &sev, &timer_id) == 0) {
        struct itimerspec when = {
            .it_value = {(time_t)(st->deadline_ns / 1000000000u),
                         (long)(st->deadline_ns % 1000000000u)},
        };
        armed = 1;
        if (syscall(SYS_timer_settime, timer_id, TIMER_ABSTIME, &when, NULL) < 0) {
            err = errno;
            *arming = 1;
            goto out;
        }
        out->bound = BOUND_TIMER;
    } else {
        pthread_condattr_t attr;
        out->bound_error = errno;
        /* The watchdog's signal: blocked here (and so in the watchdog, which
         * inherits the mask), unblocked only inside KVM_RUN. */
        sigemptyset(&both);
        sigaddset(&both, WATCHDOG_SIGNAL);
        pthread_sigmask(SIG_BLOCK, &both, NULL);
        take_watchdog(NULL, &theirs_classic);
        err = set_kvm_mask(vcpu, &saved, sig, 1);
        if (err) {
            *arming = 1;
            goto out;
        }
        memset(&w, 0, sizeof(w));
        w.pid = getpid();
        w.tid = (pid_t)syscall(SYS_gettid);
        w.deadline_ns = st->deadline_ns;
        pthread_mutex_init(&w.lock, NULL);
        pthread_condattr_init(&attr);
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
        pthread_cond_init(&w.wake, &attr);
        pthread_condattr_destroy(&attr);
        if (pthread_create(&watcher, NULL, watch, &w) == 0) {
            watching = 1;
            out->bound = BOUND_WATCHDOG;
        } else {
            pthread_cond_destroy(&w.wake);
            pthread_mutex_destroy(&w.lock);
            out->bound = BOUND_NONE;  /* the result still counts, unbounded */
        }
    }
    clock = run_clock(&start);
    for (;;) {
        out->runs++;
        if (ioctl(vcpu, KVM_RUN, 0) == 0)
            break;
        if (errno != EINTR) {
            err = errno;
            break;
        }
        int before = stashed, classic = theirs_classic;
        if (take_pending(&block, sig, cookie, stash, &stashed) ||
            (watching && take_watchdog(&w, &theirs_classic))) {
            out->timed_out = 1;
            break;
        }
        if (stashed == before && classic == theirs_classic) {
            /* Another signal: let the caller run its handler, then resume. */
            out->interrupted = 1;
            break;
        }
    }
    end = start;
    read_ns(clock, &end);  /* it answered run_clock */
    *elapsed = end > start ? end - start : 0;
out:
    if (armed)
        syscall(SYS_timer_delete, timer_id);
    if (watching) {
        pthread_mutex_lock(&w.lock);
        w.stop = 1;
        pthread_cond_signal(&w.wake);
        pthread_mutex_unlock(&w.lock);
        pthread_join(watcher, NULL);
        take_watchdog(&w, &theirs_classic);  /* a late one of ours goes */
        pthread_cond_destroy(&w.wake);
        pthread_mutex_destroy(&w.lock);
    }
    /* Drop our own late expiry; keep anyone else's. */
    take_pending(&block, sig, cookie, stash, &stashed);
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    if (theirs_classic)
        syscall(SYS_tgkill, getpid(), (pid_t)syscall(SYS_gettid), WATCHDOG_SIGNAL);
    for (int i = 0; i < stashed; i++) {
        /* Queued again exactly as it came, to this thread. */
        if (syscall(SYS_rt_tgsigqueueinfo, getpid(), (pid_t)syscall(SYS_gettid),
                    sig, &stash[i]) == 0)
            out->requeued++;
    }
    if (!out->interrupted)
        st->deadline_ns = 0;
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
    case OP_RUN: {
        int arming;
        if (st->run_addr == 0)
            return fail(out, op->step, EFAULT);
        err = run_bounded(st->fds[op->fd], st, op->request, (int)op->arg,
                          op->src, out, &elapsed, &arming);
        memcpy(out->run_head, (const void *)(uintptr_t)st->run_addr,
               st->run_size < KVMSMOKE_RUN_HEAD ? st->run_size
                                                : KVMSMOKE_RUN_HEAD);
        if (op->value_out >= 0)
            out->values[op->value_out] += (int64_t)elapsed;
        if (err)
            return fail(out, arming ? (int)op->check_value : op->step, err);
        if (out->timed_out || out->interrupted)
            return fail(out, op->step, out->interrupted ? EINTR : 0);
        return 0;
    }
    case OP_UNLESS: {
        /* Go on only while lo <= max(x, 1) < hi, with
         * x = min(v[a], v[b]) - min(v[c], v[d]), and lo, hi the values of
         * slots e and f (request holds a to f, a byte each from the
         * lowest); otherwise end the array here, all having run. */
        int64_t v[6];
        for (int k = 0; k < 6; k++) {
            unsigned slot = (unsigned)(op->request >> (8 * k)) & 0xffu;
            if (slot >= KVMSMOKE_VALUES)
                return fail(out, op->step, EINVAL);
            v[k] = out->values[slot];
        }
        int64_t x = (v[0] < v[1] ? v[0] : v[1]) - (v[2] < v[3] ? v[2] : v[3]);
        if (x < 1)
            x = 1;
        if (x >= v[4] && x < v[5])
            return 0;
        out->stopped = 1;
        return 1;
    }
    default:
        return fail(out, op->step, EINVAL);
    }
}

/* Execute ops in order; stop at the first failure, or where an OP_UNLESS
 * ends the array.  Returns 0 when all ran (out->stopped says whether an
 * OP_UNLESS ended it, out->op_index where), -1 when one failed
 * (out->step, out->error, out->op_index say which). */
int kvmsmoke_exec(const struct kvmsmoke_op *ops, uint32_t count,
                  struct kvmsmoke_state *st, struct kvmsmoke_result *out)
{
    out->step = -1;
    out->error = 0;
    out->timed_out = 0;
    out->interrupted = 0;
    out->stopped = 0;
    for (uint32_t i = 0; i < count; i++) {
        int ended;
        out->op_index = (int32_t)i;
        ended = exec_one(&ops[i], st, out);
        if (ended < 0)
            return -1;
        if (ended > 0)
            return 0;
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
