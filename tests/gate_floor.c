/* The C floor of the default gate (`make bench`, and inside the nested SVM
 * host): the same KVM work SystemCheck.run() does for the default engine,
 * as straight-line C with raw ioctls.  It does not use libkvmsmoke.so, so it
 * measures what any C program would pay for the same work.
 *
 * What to do comes from a spec that tests/guest_cases.py records from one
 * real gate on the same host (gate_spec()), so the guest, its memory, the
 * special registers, the boot MSRs, every bounded run with its registers and
 * the start-up ioctls are the gate's own, in the gate's order:
 *
 *   timeout NS             the bound armed around every KVM_RUN
 *   cap N                  KVM_CHECK_EXTENSION(N) on /dev/kvm
 *   mem SIZE               the guest memory's size
 *   image HEX              its contents from guest physical 0
 *   sregs OFFSET HEX       bytes patched into kvm_sregs after KVM_GET_SREGS
 *   msr INDEX VALUE        a boot MSR, all set with one KVM_SET_MSRS
 *   regs OFFSET VALUE      a field of the kvm_regs every run starts from
 *   guest                  make the guest's VM and vCPU and set them up, where
 *                          the gate made its own (once; runs need it)
 *   run RIP RCX            set the registers, one bounded KVM_RUN
 *   getregs                KVM_GET_REGS
 *   hostloop HEX N         the host side of the speed probe: the loop's bytes, N turns
 *   vm                     a fresh VM for the start-up ioctls that follow
 *   startup REQUEST ARG    an ioctl on that VM, its argument a number
 *   startupbuf REQUEST HEX ... or a pointer to these bytes
 *   open PATH              open PATH read-write and close it
 *   stat PATH              stat(2) PATH
 *   read PATH [LIMIT]      open PATH, read up to LIMIT bytes (64 KiB), close it
 *   xattr PATH NAME        getxattr(2) NAME of PATH
 *   user UID               the user database's entry for UID (getpwuid_r)
 *   group GID              the group database's entry for GID (getgrgid_r)
 *   groupname NAME         the group database's entry named NAME (getgrnam_r)
 *
 * The last seven are the host reads the module makes through its OS seams
 * (evidence; a report makes dozens), each once: whatever the OS answers,
 * ENOENT included, the attempt is the work.
 * Usage: gate_floor SPEC N.  Prints N durations in nanoseconds, one a line,
 * each from opening /dev/kvm to closing it; the start-up VMs are closed
 * after the clock stops, as the gate hands their teardown to the background.
 * The first pass's exit reasons go to stderr ("exits 5 5 ... 17"), so the
 * caller can check that the runs ended as the gate's did.
 *
 * Built with -shared -Dmain=gate_floor_main it is the same work inside the
 * interpreter (guest_cases.floor_ratio): gate_floor_load(SPEC) once, then
 * gate_floor_once_ns() per pass, alternating with the gate pass by pass, so
 * that both see the same moment of a noisy host and the same process.
 * A failed call still exits the process (die), as the program does: the
 * floor is a measuring tool, and a floor that cannot do the gate's work
 * has nothing to report.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/kvm.h>
#include <pwd.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

enum kind { CAP, GUEST, RUN, GETREGS, HOSTLOOP, VM, STARTUP, STARTUPBUF, OPEN, STAT, READ, XATTR, USER, GROUP, GROUPNAME };

struct action {
    enum kind kind;
    uint64_t a, b;
    unsigned char *bytes; /* a buffer, or a path or name (NUL-terminated) */
    size_t len;
    char *name;           /* xattr: the attribute's name */
};

static struct action actions[4096];
static size_t n_actions;
static unsigned char *image;
static size_t image_len, mem_size;
static struct { size_t offset, len; unsigned char *bytes; } patches[64];
static size_t n_patches;
static struct { uint32_t index; uint64_t value; } msrs[64];
static size_t n_msrs;
static struct { size_t offset; uint64_t value; } regs_init[32];
static size_t n_regs;
#define DEFAULT_TIMEOUT_NS 2000000000LL /* until the spec says */
static long long timeout_ns = DEFAULT_TIMEOUT_NS;

static void die(const char *what)
{
    perror(what);
    exit(1);
}

#include "floor_bound.h"

static unsigned char *hex(const char *text, size_t *len)
{
    size_t n = strlen(text) / 2;
    unsigned char *out = malloc(n ? n : 1);
    if (out == NULL) die("malloc");
    for (size_t i = 0; i < n; i++) {
        unsigned value;
        if (sscanf(text + 2 * i, "%2x", &value) != 1) die("spec: bad hex");
        out[i] = (unsigned char)value;
    }
    *len = n;
    return out;
}

static struct action *add(enum kind kind)
{
    if (n_actions == sizeof(actions) / sizeof(actions[0])) die("spec: too long");
    struct action *act = &actions[n_actions++];
    memset(act, 0, sizeof(*act));
    act->kind = kind;
    return act;
}

static unsigned char *copy_text(const char *text)
{
    unsigned char *out = (unsigned char *)strdup(text);
    if (out == NULL) die("strdup");
    return out;
}

/* A host-read line of the spec (open, stat, read, xattr, user, group,
 * groupname) into an action; 0 when the line is none of them. */
static int host_read(const char *line, const char *word, char *text)
{
    static const struct { const char *word; enum kind kind; } verbs[] = {
        {"open", OPEN}, {"stat", STAT}, {"read", READ}, {"xattr", XATTR},
        {"user", USER}, {"group", GROUP}, {"groupname", GROUPNAME},
    };
    static char second[4096];
    for (size_t i = 0; i < sizeof(verbs) / sizeof(verbs[0]); i++) {
        if (strcmp(word, verbs[i].word) != 0) continue;
        unsigned long long limit = 1 << 16;
        int got = sscanf(line, "%*s %4095s %4095s", text, second);
        if (got < 1) die("spec: a host read without its argument");
        struct action *act = add(verbs[i].kind);
        act->bytes = copy_text(text);
        if (act->kind == READ && got == 2 && sscanf(second, "%llu", &limit) != 1)
            die("spec: bad read limit");
        if (act->kind == XATTR) {
            if (got != 2) die("spec: xattr without its name");
            act->name = (char *)copy_text(second);
        }
        act->a = act->kind == READ ? limit : strtoull(text, NULL, 10);
        return 1;
    }
    return 0;
}

static void read_spec(const char *path)
{
    FILE *spec = fopen(path, "r");
    if (spec == NULL) die(path);
    static char line[1 << 20], word[32], text[1 << 20];
    while (fgets(line, sizeof(line), spec) != NULL) {
        unsigned long long a = 0, b = 0;
        if (sscanf(line, "%31s", word) != 1) continue;
        if (!strcmp(word, "timeout") && sscanf(line, "%*s %llu", &a) == 1) {
            timeout_ns = (long long)a;
        } else if (!strcmp(word, "cap") && sscanf(line, "%*s %llu", &a) == 1) {
            add(CAP)->a = a;
        } else if (!strcmp(word, "mem") && sscanf(line, "%*s %llu", &a) == 1) {
            mem_size = a;
        } else if (!strcmp(word, "image") && sscanf(line, "%*s %s", text) == 1) {
            image = hex(text, &image_len);
        } else if (!strcmp(word, "sregs") && sscanf(line, "%*s %llu %s", &a, text) == 2) {
            patches[n_patches].offset = a;
            patches[n_patches].bytes = hex(text, &patches[n_patches].len);
            if (++n_patches == 64) die("spec: too many sregs patches");
        } else if (!strcmp(word, "msr") && sscanf(line, "%*s %llu %llu", &a, &b) == 2) {
            msrs[n_msrs].index = (uint32_t)a;
            msrs[n_msrs].value = b;
            if (++n_msrs == 64) die("spec: too many MSRs");
        } else if (!strcmp(word, "regs") && sscanf(line, "%*s %llu %llu", &a, &b) == 2) {
            regs_init[n_regs].offset = a;
            regs_init[n_regs].value = b;
            if (++n_regs == 32) die("spec: too many registers");
        } else if (!strcmp(word, "run") && sscanf(line, "%*s %llu %llu", &a, &b) == 2) {
            struct action *act = add(RUN);
            act->a = a;
            act->b = b;
        } else if (!strcmp(word, "guest")) {
            add(GUEST);
        } else if (!strcmp(word, "getregs")) {
            add(GETREGS);
        } else if (!strcmp(word, "hostloop") && sscanf(line, "%*s %s %llu", text, &a) == 2) {
            struct action *act = add(HOSTLOOP);
            act->bytes = hex(text, &act->len);
            act->a = a;
        } else if (!strcmp(word, "vm")) {
            add(VM);
        } else if (!strcmp(word, "startup") && sscanf(line, "%*s %llu %llu", &a, &b) == 2) {
            struct action *act = add(STARTUP);
            act->a = a;
            act->b = b;
        } else if (!strcmp(word, "startupbuf") && sscanf(line, "%*s %llu %s", &a, text) == 2) {
            struct action *act = add(STARTUPBUF);
            act->a = a;
            act->bytes = hex(text, &act->len);
        } else if (host_read(line, word, text)) {
            continue;
        } else {
            fprintf(stderr, "spec: cannot read: %s", line);
            exit(1);
        }
    }
    fclose(spec);
    if (mem_size == 0 || image == NULL || image_len > mem_size) die("spec: no guest");
    size_t guests = 0;
    for (size_t i = 0; i < n_actions; i++) guests += actions[i].kind == GUEST;
    if (guests != 1) die("spec: not one guest line");
}

static void (*host_loop)(uint32_t);
static unsigned exits[4096];
static size_t n_exits;
static long long run_ns; /* the last pass's KVM_RUNs, on the thread's CPU clock */
static long long release_ns; /* the last pass's teardown of the guest's VM */
static long long pause_ns; /* a wait before that teardown (gate_floor_pause_us) */

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* One bounded KVM_RUN (floor_bound.h), its exit reason and time noted. */
static void bounded_run(int vcpu, struct kvm_run *run)
{
    run_ns += floor_bounded_run(vcpu, timeout_ns);
    if (n_exits < sizeof(exits) / sizeof(exits[0])) exits[n_exits++] = run->exit_reason;
}

/* One host read, as the module's seam makes it; the OS's answer, a
 * missing file's ENOENT included, is not a failure of the floor. */
static void do_host_read(const struct action *act)
{
    static char buf[1 << 20];
    static char db[1 << 16];
    const char *path = (const char *)act->bytes;
    struct stat st;
    struct passwd pw, *pwp;
    struct group gr, *grp;
    int fd;
    switch (act->kind) {
    case OPEN:
        fd = open(path, O_RDWR | O_CLOEXEC);
        if (fd >= 0) close(fd);
        break;
    case STAT:
        stat(path, &st);
        break;
    case READ: {
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) break;
        size_t want = act->a < sizeof(buf) ? act->a : sizeof(buf), got = 0;
        while (got < want) {
            ssize_t n = read(fd, buf + got, want - got);
            if (n <= 0) break;
            got += (size_t)n;
        }
        close(fd);
        break;
    }
    case XATTR:
        getxattr(path, act->name, buf, sizeof(buf));
        break;
    case USER:
        getpwuid_r((uid_t)act->a, &pw, db, sizeof(db), &pwp);
        break;
    case GROUP:
        getgrgid_r((gid_t)act->a, &gr, db, sizeof(db), &grp);
        break;
    case GROUPNAME:
        getgrnam_r(path, &gr, db, sizeof(db), &grp);
        break;
    default:
        die("not a host read");
    }
}

/* The guest's VM and vCPU while a pass has them (make_guest). */
static struct {
    void *mem;
    int vm, vcpu;
    size_t size;
    struct kvm_run *run;
} guest = {.vm = -1, .vcpu = -1};

/* The guest's VM, closed but not torn down: its run area holds the vCPU,
 * and through it the VM, as the gate leaves it to its releasing thread. */
static struct kvm_run *pending_run;
static size_t pending_run_size;
static void *pending_mem;

/* What the gate does on its clock when it is done with its guest's VM:
 * keep the run area out of forks, close the vCPU and the VM. */
static void release_guest(void)
{
    if (madvise(guest.run, guest.size, MADV_DONTFORK) != 0) die("madvise run area");
    if (close(guest.vcpu) != 0) die("close vCPU");
    if (close(guest.vm) != 0) die("close VM");
    pending_run = guest.run;
    pending_run_size = guest.size;
    pending_mem = guest.mem;
    guest.vm = guest.vcpu = -1;
}

/* The guest VM's teardown, after the pass's clock has stopped, as the
 * gate's thread bears it: unmap the run area (the last reference), then
 * the guest memory.  It waits pause_ns first, off the teardown's clock. */
static void settle_guest(void)
{
    if (pending_run == NULL) return;
    struct timespec wait = {pause_ns / 1000000000LL, pause_ns % 1000000000LL};
    while (pause_ns > 0 && nanosleep(&wait, &wait) != 0)
        if (errno != EINTR) die("nanosleep");
    long long began = now_ns();
    if (munmap(pending_run, pending_run_size) != 0) die("munmap run area");
    if (munmap(pending_mem, mem_size) != 0) die("munmap guest memory");
    release_ns = now_ns() - began;
    pending_run = NULL;
}

static int startup_fds[8];
static size_t n_startup;

static void make_guest(int kvm)
{
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) die("KVM_GET_API_VERSION");
    void *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap guest memory");
    memcpy(mem, image, image_len);
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    struct kvm_userspace_memory_region region = {
        .memory_size = mem_size, .userspace_addr = (uint64_t)(uintptr_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    static union {
        struct kvm_cpuid2 head;
        unsigned char b[sizeof(struct kvm_cpuid2) + 256 * sizeof(struct kvm_cpuid_entry2)];
    } cpuid;
    cpuid.head.nent = 256;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0) die("KVM_GET_SUPPORTED_CPUID");
    if (ioctl(vcpu, KVM_SET_CPUID2, &cpuid) < 0) die("KVM_SET_CPUID2");
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    for (size_t i = 0; i < n_patches; i++)
        memcpy((unsigned char *)&sregs + patches[i].offset, patches[i].bytes, patches[i].len);
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (size < (int)sizeof(struct kvm_run)) die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap run area");
    static union {
        struct kvm_msrs head;
        unsigned char b[sizeof(struct kvm_msrs) + 64 * sizeof(struct kvm_msr_entry)];
    } boot;
    boot.head.nmsrs = (uint32_t)n_msrs;
    for (size_t i = 0; i < n_msrs; i++) {
        boot.head.entries[i].index = msrs[i].index;
        boot.head.entries[i].data = msrs[i].value;
    }
    if (ioctl(vcpu, KVM_SET_MSRS, &boot) != (int)n_msrs) die("KVM_SET_MSRS");
    static union {
        struct kvm_msr_list head;
        unsigned char b[sizeof(struct kvm_msr_list) + 1024 * sizeof(uint32_t)];
    } list, features;
    list.head.nmsrs = features.head.nmsrs = 1024;
    if (ioctl(kvm, KVM_GET_MSR_INDEX_LIST, &list) < 0) die("KVM_GET_MSR_INDEX_LIST");
    ioctl(kvm, KVM_GET_MSR_FEATURE_INDEX_LIST, &features); /* soft, as in the gate */
    /* IA32_ARCH_CAPABILITIES read and set back, as QEMU does; soft, and
     * made whatever the CPUID offers, as in the gate. */
    static union {
        struct kvm_msrs head;
        unsigned char b[sizeof(struct kvm_msrs) + sizeof(struct kvm_msr_entry)];
    } arch;
    arch.head.nmsrs = 1;
    arch.head.entries[0].index = 0x10a;
    ioctl(kvm, KVM_GET_MSRS, &arch);
    ioctl(vcpu, KVM_SET_MSRS, &arch);
    guest.mem = mem;
    guest.vm = vm;
    guest.vcpu = vcpu;
    guest.size = (size_t)size;
    guest.run = run;
}

static void once(void)
{
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("open /dev/kvm");
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) die("KVM_GET_API_VERSION");
    size_t at = 0;
    for (; at < n_actions && actions[at].kind == CAP; at++)
        if (ioctl(kvm, KVM_CHECK_EXTENSION, actions[at].a) < 0) die("KVM_CHECK_EXTENSION");

    /* The rest in the gate's order: the guest's set-up, its runs (the
     * speed probe's and the guest's own, with their registers), the start-up
     * VMs and their ioctls, the host reads. */
    struct kvm_regs regs;
    int vmfd = -1;
    for (; at < n_actions; at++) {
        struct action *act = &actions[at];
        switch (act->kind) {
        case GUEST:
            make_guest(kvm);
            break;
        case RUN:
            if (guest.vcpu < 0) die("spec: a run without the guest");
            memset(&regs, 0, sizeof(regs));
            for (size_t i = 0; i < n_regs; i++)
                memcpy((unsigned char *)&regs + regs_init[i].offset, &regs_init[i].value, 8);
            regs.rip = act->a;
            regs.rcx = act->b;
            if (ioctl(guest.vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
            bounded_run(guest.vcpu, guest.run);
            break;
        case GETREGS:
            if (guest.vcpu < 0) die("spec: getregs without the guest");
            if (ioctl(guest.vcpu, KVM_GET_REGS, &regs) < 0) die("KVM_GET_REGS");
            break;
        case HOSTLOOP: {
            struct timespec cpu[2]; /* timed as the gate times it */
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu[0]);
            host_loop((uint32_t)act->a);
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu[1]);
            break;
        }
        case VM:
            if (n_startup == sizeof(startup_fds) / sizeof(startup_fds[0])) die("spec: too many VMs");
            vmfd = ioctl(kvm, KVM_CREATE_VM, 0);
            if (vmfd < 0) die("KVM_CREATE_VM");
            startup_fds[n_startup++] = vmfd;
            break;
        case STARTUP:
            if (ioctl(vmfd, act->a, act->b) < 0) die("start-up ioctl");
            break;
        case STARTUPBUF:
            if (ioctl(vmfd, act->a, act->bytes) < 0) die("start-up ioctl");
            break;
        case OPEN:
        case STAT:
        case READ:
        case XATTR:
        case USER:
        case GROUP:
        case GROUPNAME:
            do_host_read(act);
            break;
        case CAP:
            die("spec: cap after the guest");
        }
    }
    if (guest.vcpu >= 0) release_guest();
    close(kvm);
}

/* Forget the last spec: a process may load several (one per backend). */
static void unload(void)
{
    for (size_t i = 0; i < n_actions; i++) {
        free(actions[i].bytes);
        free(actions[i].name);
    }
    for (size_t i = 0; i < n_patches; i++) free(patches[i].bytes);
    free(image);
    image = NULL;
    image_len = mem_size = n_actions = n_patches = n_msrs = n_regs = 0;
    timeout_ns = DEFAULT_TIMEOUT_NS;
    if (host_loop != NULL && munmap((void *)host_loop, 4096) != 0) die("munmap host loop");
    host_loop = NULL;
}

/* Read the spec and make the speed probe's host loop executable, before
 * any pass. */
void gate_floor_load(const char *path)
{
    unload();
    read_spec(path);
    for (size_t i = 0; i < n_actions; i++) {
        if (actions[i].kind != HOSTLOOP || host_loop != NULL) continue;
        /* The loop's bytes in a page mapped writable, then executable. */
        void *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (page == MAP_FAILED) die("mmap host loop");
        memcpy(page, actions[i].bytes, actions[i].len);
        if (mprotect(page, 4096, PROT_READ | PROT_EXEC) != 0) die("mprotect");
        host_loop = (void (*)(uint32_t))page;
    }
}

/* One pass, timed from opening /dev/kvm to closing it; the guest's VM is
 * torn down and the start-up VMs closed after the clock stops, as the
 * gate leaves them to its releasing thread.  Its exit reasons replace the
 * last pass's (gate_floor_exits). */
/* A descriptor (a tracer's marker file) told when a pass's clock stops,
 * or -1: a trace of the pass can then leave its teardown aside. */
static int stop_mark = -1;

void gate_floor_mark_stop(int fd) { stop_mark = fd; }

long long gate_floor_once_ns(void)
{
    struct timespec a, b;
    n_exits = 0;
    run_ns = release_ns = 0;
    clock_gettime(CLOCK_MONOTONIC, &a);
    once();
    clock_gettime(CLOCK_MONOTONIC, &b);
    if (stop_mark >= 0 && write(stop_mark, "pass stop\n", 10) != 10) die("write the stop mark");
    settle_guest();
    for (size_t k = 0; k < n_startup; k++) close(startup_fds[k]);
    n_startup = 0;
    return (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec);
}

/* The last pass's KVM_RUNs: their nanoseconds on the thread's CPU clock,
 * as the gate times each of its own. */
long long gate_floor_run_ns(void) { return run_ns; }

/* The last pass's teardown of the guest's VM (the unmaps of its run area
 * and memory, after the pass's clock), on the monotonic clock. */
long long gate_floor_release_ns(void) { return release_ns; }

/* From now on, wait US microseconds between the end of a pass's clock
 * and its guest VM's teardown (0: none).  On Linux 6.1 the teardown
 * costs about 10 ms more once a few milliseconds have passed since the VM
 * was made: this shows how much of the floor's release is that timing. */
void gate_floor_pause_us(long long us) { pause_ns = us * 1000; }

/* The last pass's exit reasons, up to cap of them into out; their count. */
size_t gate_floor_exits(unsigned *out, size_t cap)
{
    size_t n = n_exits < cap ? n_exits : cap;
    memcpy(out, exits, n * sizeof(exits[0]));
    return n;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: gate_floor SPEC N\n");
        return 2;
    }
    gate_floor_load(argv[1]);
    int n = atoi(argv[2]);
    for (int i = 0; i < n; i++) {
        long long ns = gate_floor_once_ns();
        if (i == 0) {
            fprintf(stderr, "exits");
            for (size_t k = 0; k < n_exits; k++) fprintf(stderr, " %u", exits[k]);
            fprintf(stderr, "\n");
        }
        printf("%lld\n", ns);
    }
    return 0;
}
