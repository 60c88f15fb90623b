/* The bound both C floors arm around KVM_RUN, as the gate arms it: the
 * signal blocked in the thread and let through only inside KVM_RUN
 * (KVM_SET_SIGNAL_MASK), a one-shot timer aimed at this thread, deleted
 * after the run, the run timed on the thread's CPU clock (its nanoseconds
 * returned).  The including file defines die(const char *). */
#ifndef FLOOR_BOUND_H
#define FLOOR_BOUND_H

#include <linux/kvm.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static long long floor_bounded_run(int vcpu, long long timeout_ns)
{
    int sig = SIGRTMAX - 1, timer;
    sigset_t block, saved;
    sigemptyset(&block);
    sigaddset(&block, sig);
    if (pthread_sigmask(SIG_BLOCK, &block, &saved) != 0) die("pthread_sigmask");
    union {
        struct kvm_signal_mask head;
        unsigned char b[sizeof(struct kvm_signal_mask) + 8];
    } km;
    km.head.len = 8;
    memcpy(km.head.sigset, &saved, 8);
    if (ioctl(vcpu, KVM_SET_SIGNAL_MASK, &km) < 0) die("KVM_SET_SIGNAL_MASK");
    struct sigevent sev = {.sigev_notify = SIGEV_THREAD_ID, .sigev_signo = sig};
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
    if (syscall(SYS_timer_create, CLOCK_MONOTONIC, &sev, &timer) < 0) die("timer_create");
    struct itimerspec when = {.it_value = {timeout_ns / 1000000000LL, timeout_ns % 1000000000LL}};
    if (syscall(SYS_timer_settime, timer, 0, &when, NULL) < 0) die("timer_settime");
    /* Timed on the thread's CPU clock, as the gate times each run. */
    struct timespec cpu[2];
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu[0]);
    if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu[1]);
    if (syscall(SYS_timer_delete, timer) < 0) die("timer_delete");
    if (pthread_sigmask(SIG_SETMASK, &saved, NULL) != 0) die("pthread_sigmask");
    return (cpu[1].tv_sec - cpu[0].tv_sec) * 1000000000LL + (cpu[1].tv_nsec - cpu[0].tv_nsec);
}

#endif
