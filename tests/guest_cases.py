"""Cases run inside a throwaway KVM host booted by tests/vmhost.py.

Prints one line per case: ``CASE <name> PASS|FAIL|INFO <detail>``.  Standard
library only: the guest has Debian's Python and nothing else.
"""

from __future__ import annotations

import faulthandler
import json
import os
import platform
import subprocess
import sys
import threading
import time
from typing import Any, NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from clocks import Parked, Pieces  # noqa: E402

import boxlite_syscheck as b  # noqa: E402

# The longest a case may go without a word: longer than any bound a case
# sets itself (a subprocess's 300 s), shorter than vmhost's silence cap.
# Past it the process prints every thread's stack and exits, and /init goes
# on to "vmhost-guest: done": a hang of ours is told from the emulated host
# itself stopping, which never gets that far.
CASE_LIMIT = 400.0


def announce(name: str, status: str, detail: str) -> None:
    print(f"CASE {name} {status} {detail}", flush=True)
    faulthandler.dump_traceback_later(CASE_LIMIT, exit=True)


def case(name: str, ok: bool, detail: str) -> None:
    announce(name, "PASS" if ok else "FAIL", detail)


def guarded(name: str, body) -> None:
    try:
        body()
    except Exception as err:  # a case that crashes is a failed case, not a lost one
        case(name, False, f"{type(err).__name__}: {err}")


LONG_MODE = platform.machine() == "x86_64"  # aarch64 runs the arm64 guest


def with_svm() -> None:
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    os.close(fd)
    case("kvm-device", True, f"/dev/kvm opens; modules: {', '.join(b.Evidence().kvm_modules)}")
    results = {}
    for backend in ("native", "python"):

        def gate(kind: str = backend) -> None:
            with b.SystemCheck.run(backend=kind) as host:
                smoke = host.smoke
                results[kind] = smoke
                ok = smoke is not None and smoke.ok and (smoke.emulated is False or not LONG_MODE)
                case(f"gate-{kind}", ok, host.describe())

        guarded(f"gate-{backend}", gate)
    if len(results) == 2:
        same = b._outcome(results["native"]) == b._outcome(results["python"])
        case(
            "backends-agree",
            same,
            "identical outcomes"
            if same
            else f"{b._outcome(results['native'])} != {b._outcome(results['python'])}",
        )
    else:
        case("backends-agree", False, "a gate failed")

    def report() -> None:
        rep = b.check()
        layers = {f.id: f.status for f in rep.findings}
        want = (
            ("kvm.smoke", "guest.speed", "guest.stock_kernel", "guest.msrs")
            if LONG_MODE
            else ("kvm.smoke", "engine.libkrun")
        )
        ok = rep.verdict != b.NOT_USABLE and all(layers.get(k) == "pass" for k in want)
        case(
            "report",
            ok,
            f"verdict {rep.verdict}; " + ", ".join(f"{k} {layers.get(k)}" for k in want),
        )
        speed = next((f for f in rep.findings if f.id == "guest.speed"), None)
        if speed is not None:
            print("REPORT-SPEED " + json.dumps(speed.evidence), flush=True)

    guarded("report", report)

    def engines() -> None:
        verdicts = b.check().engines
        b._wait_for_closes()
        runs = [name for name, v in verdicts.items() if v["verdict"] == b.WOULD_RUN]
        others = {name: v["why"] for name, v in verdicts.items() if name not in runs}
        detail = f"would run: {', '.join(runs)}" + (f"; not: {others}" if others else "")
        if LONG_MODE:
            case("engines", set(runs) == set(b.ENGINES), detail)
        else:  # arm64 capabilities depend on the emulated GIC: reported, not judged
            announce("engines", "INFO", detail)

    guarded("engines", engines)

    def bare() -> None:
        with b.SystemCheck.run(engine=None) as host:
            case("bare-device", host.smoke_tested, host.describe())

    guarded("bare-device", bare)

    def cli() -> None:
        done = subprocess.run(
            [sys.executable, os.path.join(HERE, "boxlite_syscheck.py"), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        report = json.loads(done.stdout)
        ok = done.returncode == 0 and report["error"] is None
        case("cli-json", ok, f"exit {done.returncode}, verdict {report['verdict']}")

    guarded("cli-json", cli)
    if LONG_MODE and os.path.isdir(XDG):
        deep_cases()
    if LONG_MODE:
        guarded("bench", bench)
        guarded("speed-under-load", speed_under_load)
    else:
        guarded("bound", arm64_bound)
        guarded("deep-unavailable", arm64_deep)


def arm64_deep() -> None:
    """--deep on arm64: said to be unavailable, and the check does not fail for it."""
    rep = b.check(deep=True)
    deep = next(f for f in rep.findings if f.id == "deep.boot")
    with b.SystemCheck.run(deep=True) as host:
        passed = host.smoke_tested
    ok = deep.status == "skip" and "device tree" in deep.summary and rep.verdict != b.NOT_USABLE
    case("deep-unavailable", ok and passed, deep.summary)


# BoxLite's libkrunfw, where BoxLite would have extracted it (tests/vmhost.py
# copies it in: the nested host has no network).
XDG = "/xdg"


# The deep boot's bound here.  A hardware host boots the engine's kernel in
# under a second; this one is KVM under QEMU's emulator, where the boot took
# 18-23 s on a loaded CI machine with the native backend and over 30 s (the
# default bound) with the Python one.
DEEP_TIMEOUT = 180.0


def deep_cases() -> None:
    """The engine's own kernel boots here, to its root-mount panic: the gate
    with --deep passes with both backends, and the report says how far."""
    os.environ["XDG_DATA_HOME"] = XDG
    for backend in ("native", "python"):

        def gate(kind: str = backend) -> None:
            start = time.monotonic()
            with b.SystemCheck.run(backend=kind, deep=True, deep_timeout=DEEP_TIMEOUT):
                took = time.monotonic() - start
            case(f"deep-{kind}", True, f"the gate with --deep passed in {took:.2f} s")

        guarded(f"deep-{backend}", gate)

    def report() -> None:
        rep = b.check(deep=True, deep_timeout=DEEP_TIMEOUT)
        deep = next(f for f in rep.findings if f.id == "deep.boot")
        reached = set(deep.evidence["milestones_s"])
        wanted = {"loaded", "first-output", "version", "root-mount", "reset"}
        with open("/proc/self/status") as status:
            peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        memory = deep.evidence["guest_memory_bytes"] // 1024
        ok = deep.status == "pass" and wanted <= reached and rep.verdict != b.NOT_USABLE
        ok = ok and peak <= 2 * memory + 32 * 1024  # the interpreter's own, and about 2x
        # Every line was printed before the reset, and seen by then.
        times = deep.evidence["milestones_s"]
        ok = ok and all(at <= times["reset"] for at in times.values())
        # The console's cursor is not drawn: its shape's CRTC reads would be
        # about 980 exits of a boot's 1,000; a few dozen remain.
        ok = ok and deep.evidence["kvm_exits"] < 200
        case("deep-report", ok, f"{deep.summary}; peak RSS {peak // 1024} MiB")
        print("DEEP-BOOT " + json.dumps(deep.evidence), flush=True)

    guarded("deep-report", report)

    def cli() -> None:
        done = subprocess.run(
            [
                sys.executable,
                os.path.join(HERE, "boxlite_syscheck.py"),
                "--deep",
                "--deep-timeout",
                str(DEEP_TIMEOUT),
                "--format",
                "prometheus",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        ok = done.returncode == 0 and "boxlite_syscheck_deep_boot_success 1" in done.stdout
        said = [
            line for line in done.stdout.splitlines() if line.startswith("boxlite_syscheck_deep")
        ]
        case("deep-cli", ok, f"exit {done.returncode}; {said}; {done.stderr.strip()[-300:]}")

    guarded("deep-cli", cli)


def arm64_bound() -> None:
    """A guest that never stops ("b ." at its entry) ends at the bound, both backends."""
    spin = b._Guest(
        "aarch64-spin",
        (0x14000000).to_bytes(4, "little"),
        0x1000,
        0x10000,
        {},
        {},
        base=0x10000,
        arch="aarch64",
    )
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        seen = []
        for backend in ("native", "python"):
            start = time.monotonic()
            result = b._run_program(fd, spin, 0.5, backend)
            seen.append((backend, result.timed_out, round(time.monotonic() - start, 2)))
        ok = all(timed_out and 0.5 <= took < 2.0 for _, timed_out, took in seen)
        case("bound", ok, f"(backend, timed out, seconds): {seen}")
    finally:
        os.close(fd)


class NativeShare:
    """Time spent in native code during the gate: the operation arrays in
    libkvmsmoke.so, the VM's teardown (closing its descriptors destroys it in
    the kernel), the host loop, and opening and closing /dev/kvm.  What a C
    program doing the same work would spend; the rest is Python's."""

    def __init__(self) -> None:
        self.ns = 0

    def __enter__(self) -> NativeShare:
        native, share = b._NativeBackend, self
        self.saved = (native.execute, native.release, b._host_loop())
        execute, release, loop = self.saved

        def timed(call):
            def wrapper(*args):
                start = time.perf_counter_ns()
                try:
                    return call(*args)
                finally:
                    share.ns += time.perf_counter_ns() - start

            return wrapper

        native.execute, native.release = timed(execute), timed(release)
        b._CACHE["host_loop"] = timed(loop)
        return self

    def __exit__(self, *exc: object) -> None:
        b._NativeBackend.execute, b._NativeBackend.release, b._CACHE["host_loop"] = self.saved

    def open_close(self) -> None:
        start = time.perf_counter_ns()
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
        self.ns += time.perf_counter_ns() - start


#: The seams whose host work tests/gate_floor.c replays, and its spec verb
#: for each: a report reads files and the user database as well as KVM.
_OS_SEAMS = {
    "_open_device": "open",
    "_stat": "stat",
    "_exists": "stat",
    "_read_text": "read",
    "_getxattr": "xattr",
    "_user_name": "user",
    "_group_entry": "group",
    "_group_named": "groupname",
}


def _work(work: str, backend: str) -> None:
    """One pass of the work a floor stands for: the default gate, or check()."""
    if work == "check":
        b.check(backend=backend)
        return
    try:
        b.SystemCheck.run(backend=backend).close()
    except b.BoxliteError:
        pass  # a refusal is the gate's work too


def gate_spec(work: str = "gate") -> str:
    """What one real gate (or, ``work`` "check", one check()) did, as
    tests/gate_floor.c's spec: the guest, its special registers and MSRs,
    every bounded run with its registers in the order they ran, the host
    loop, the start-up ioctls, and each host read through the module's OS
    seams.  A read is recorded once, however often the module made it: the
    floor is C doing the work, and a second read of the same file is ours.
    The pass recorded is a warm one: what only a first pass does (loading
    the library, say) is not the work of every pass."""
    import ctypes

    _work(work, "native")

    lines: list[str] = [f"timeout {int(b.DEFAULT_TIMEOUT * 1e9)}"]
    names = (
        "_kvm_answers",
        "_host_ns_per_iteration",
        "_probe_startup_ioctls",
        *_OS_SEAMS,
    )
    saved = {name: getattr(b, name) for name in names}
    saved_array, saved_execute = b._Kit.array, b._Session.execute
    caps, sessions, reads = [], [], set()
    regs_type = b._abi().KvmRegs

    def kvm_answers(fd, names, backend=None):
        names = list(names)
        caps.extend(b.KVM_CAPS[name] for name in names)
        return saved["_kvm_answers"](fd, names, backend)

    built: list[Any] = []

    def array(kit, plan, key=None):
        built[:] = [saved_array(kit, plan, key)]  # the array about to run
        return built[0]

    startup_slots = (b._STARTUP_VM, b._SPLIT_VM)

    def execute(session, plan, key=None):
        first = not sessions
        sessions.append(session)
        ran = saved_execute(session, plan, key)
        # Read off the array as far as it ran (an OP_UNLESS may end it
        # early): each run with the registers its KVM_SET_REGS gave it, and
        # a KVM_GET_REGS when that was the last operation made.  The gate's
        # first array begins with its start-up VMs and their ioctls, then
        # makes the guest's VM.
        ops, made = built[0][0], session.out.op_index + 1
        if first:
            by_request = {request: (arg, buf) for request, arg, buf in b._startup_args().values()}
            for op in ops[:made]:
                if op.kind == b._OP_IOCTL and op.fd_out in startup_slots:
                    lines.append("vm")
                elif op.kind == b._OP_IOCTL and op.fd in startup_slots:
                    arg, buffer = by_request[op.request]
                    if buffer is None:
                        lines.append(f"startup {op.request} {arg}")
                    else:
                        lines.append(f"startupbuf {op.request} {bytes(buffer).hex()}")
            lines.append("guest")
        regs = None
        for op in ops[:made]:
            if op.kind == b._OP_IOCTL and op.request == b.KVM_SET_REGS:
                regs = regs_type.from_address(op.arg)
            elif op.kind == b._OP_RUN:
                lines.append(f"run {regs.rip} {regs.rcx}")
        last = ops[made - 1]
        if last.kind == b._OP_IOCTL and last.request == b.KVM_GET_REGS:
            lines.append("getregs")
        return ran

    def host_ns(iterations):
        lines.extend([f"hostloop {b._HOST_LOOP.hex()} {iterations}"] * 2)  # it takes the best of 2
        return saved["_host_ns_per_iteration"](iterations)

    def startup(fd, names, backend=None):  # check()'s start-up ioctls, made alone
        wanted = b._startup_wanted(names)
        args = b._startup_args()
        for index, name in enumerate(wanted):
            if index == 0 or name == "KVM_ENABLE_CAP(SPLIT_IRQCHIP)":
                lines.append("vm")
            request, arg, buffer = args[name]
            if buffer is None:
                lines.append(f"startup {request} {arg}")
            else:
                lines.append(f"startupbuf {request} {bytes(buffer).hex()}")
        return saved["_probe_startup_ioctls"](fd, names, backend)

    def seam(name):
        verb, call = _OS_SEAMS[name], saved[name]

        def recorded(*args):
            line = " ".join([verb, *map(str, args)])
            if len(line.split()) != len(args) + 1:
                raise ValueError(f"the floor's spec cannot hold {args!r}")
            if line not in reads:
                reads.add(line)
                lines.append(line)
            return call(*args)

        return recorded

    patched = {
        "_kvm_answers": kvm_answers,
        "_host_ns_per_iteration": host_ns,
        "_probe_startup_ioctls": startup,
        **{name: seam(name) for name in _OS_SEAMS},
    }
    for name, value in patched.items():
        setattr(b, name, value)
    b._Kit.array, b._Session.execute = array, execute
    try:
        _work(work, "native")
    finally:
        for name, value in saved.items():
            setattr(b, name, value)
        b._Kit.array, b._Session.execute = saved_array, saved_execute
    guest = b._guest("long-mode")
    if any(session.guest is not guest for session in sessions):
        raise ValueError(f"{work} ran a guest other than the long-mode one: no spec holds it")
    # The C opens the device itself, first: the work's first open is that one.
    first_open = f"open {b.KVM_DEVICE}"
    if first_open in lines:
        lines.remove(first_open)
    wanted, spans = guest.wanted()
    raw = ctypes.string_at(ctypes.addressof(wanted), ctypes.sizeof(wanted))
    head = [f"cap {cap}" for cap in caps]
    head += [f"mem {guest.mem_size}", f"image {guest.image.hex()}"]
    head += [f"sregs {offset} {raw[offset : offset + size].hex()}" for offset, size in spans]
    head += [f"msr {index} {value}" for _, index, value in b.BOOT_MSRS]
    for name, value in guest.regs.items():
        if name not in ("rip", "rcx"):
            head.append(f"regs {getattr(regs_type, name).offset} {value}")
    return "\n".join(head + lines) + "\n"


class Floored(NamedTuple):
    """floor_ratio's answer: medians in ms, and the floor's exit reasons."""

    ms: float  # the work's pass
    floor_ms: float  # the C's pass
    exits: str
    run_ms: float  # the work's KVM_RUNs (RunTime)
    floor_run_ms: float  # the C's KVM_RUNs
    floor_release_ms: float  # the C's teardown of its guest's VM


def load_floor(floor: str, spec: str) -> Any:
    """tests/gate_floor.c built as a library (``floor``), its calls typed,
    with ``spec`` (gate_spec's text) loaded."""
    import ctypes
    import tempfile

    lib = ctypes.CDLL(os.path.abspath(floor))
    lib.gate_floor_load.argtypes = [ctypes.c_char_p]
    lib.gate_floor_load.restype = None
    lib.gate_floor_pause_us.argtypes = [ctypes.c_longlong]
    lib.gate_floor_pause_us.restype = None
    lib.gate_floor_mark_stop.argtypes = [ctypes.c_int]
    lib.gate_floor_mark_stop.restype = None
    lib.gate_floor_exits.restype = ctypes.c_size_t
    for name in ("once_ns", "run_ns", "release_ns"):
        getattr(lib, "gate_floor_" + name).restype = ctypes.c_longlong
    with tempfile.NamedTemporaryFile("w", suffix=".spec") as file:
        file.write(spec)
        file.flush()
        lib.gate_floor_load(file.name.encode())
    return lib


def floor_ratio(floor: str, backend: str = "native", runs: int = 60, work: str = "gate") -> Floored:
    """Medians of ``runs`` passes of the work
    (the default gate, or check()) and as many passes of
    tests/gate_floor.c doing what it did here (its spec recorded from this
    host's own pass), the C built as a library (``floor``) and called in
    this process, alternating with the work pass by pass: a noisy host's
    slow swings fall on both alike.  Each side's VMs are torn down outside
    its clock (the gate's releasing thread is parked across it).  The
    KVM_RUN times (each side's runs on the thread's CPU clock, RunTime)
    tell a swing of the guest's runs, the same work on both sides, from
    one of the rest."""
    import ctypes
    import statistics

    run_ns: list[int] = []

    def timed() -> int:
        # The releasing thread is parked across the clock: its teardowns
        # come after it, as the C's come after its own.  Free inside the
        # clock, on a one-vCPU host the thread took the CPU from the caller's
        # next lines (the device's close: 1.3-1.6 ms there, 0.07 ms held).
        with RunTime() as clock, Parked(b):
            start = time.perf_counter_ns()
            _work(work, backend)
            took = time.perf_counter_ns() - start
        b._wait_for_closes()
        run_ns.append(clock.ns)
        return took

    lib = load_floor(floor, gate_spec(work))
    timed()  # both sides warm
    lib.gate_floor_once_ns()
    passes, floors, floor_runs, floor_releases = [], [], [], []
    del run_ns[:]
    for _ in range(runs):
        floors.append(lib.gate_floor_once_ns())
        floor_runs.append(lib.gate_floor_run_ns())
        floor_releases.append(lib.gate_floor_release_ns())
        passes.append(timed())
    reasons = (ctypes.c_uint * 64)()
    count = lib.gate_floor_exits(reasons, len(reasons))
    exits = "exits " + " ".join(str(reason) for reason in reasons[:count])
    ms = [statistics.median(got) / 1e6 for got in (passes, floors, run_ns, floor_runs)]
    return Floored(ms[0], ms[1], exits, ms[2], ms[3], statistics.median(floor_releases) / 1e6)


def floor_release_paused(floor: str, pause_us: int, passes: int = 10) -> tuple[float, float]:
    """The C floor's teardown of its guest's VM (median ms over ``passes``),
    as it runs and then with ``pause_us`` more between the VM's last use and
    its teardown (one run of passes each: a pass's teardown depends on the
    last pass's timing, so the two are not interleaved).  On Linux 6.1 a
    VM's teardown stops its NX huge page recovery thread, whose exit joins
    its cgroups again and waits for an RCU grace period unless one of the
    VM's creation is still under way: a teardown soon after the creation
    is cheaper by that wait."""
    import statistics

    lib = load_floor(floor, gate_spec("gate"))
    took: dict[int, list[int]] = {0: [], pause_us: []}
    try:
        for pause, releases in took.items():
            lib.gate_floor_pause_us(pause)
            lib.gate_floor_once_ns()  # its first pass follows another timing
            for _ in range(passes):
                lib.gate_floor_once_ns()
                releases.append(lib.gate_floor_release_ns())
    finally:
        lib.gate_floor_pause_us(0)
    return statistics.median(took[0]) / 1e6, statistics.median(took[pause_us]) / 1e6


class RunTime:
    """The KVM_RUNs' time in the checks made inside it, as each backend
    times them (the thread's CPU clock, into each run's value slot): an
    array's run slots are read as soon as it has run, before the next
    array zeroes or reuses them."""

    def __init__(self) -> None:
        self.ns = 0

    def __enter__(self) -> RunTime:
        self.saved = b._Kit.array, b._Session.execute
        array, execute = self.saved
        taken: dict[int, Any] = {}  # id(kit) -> the array it gave out last
        clock = self

        def remembered(kit: Any, *args: Any) -> Any:
            built = array(kit, *args)
            taken[id(kit)] = built[0]
            return built

        def counted(session: Any, *args: Any) -> bool:
            done: bool = execute(session, *args)
            ops, values = taken[id(session.kit)], session.out.values
            slots = (ops[i].value_out for i in session.run_indices)
            clock.ns += sum(int(values[slot]) for slot in slots if slot >= 0)
            return done

        b._Kit.array, b._Session.execute = remembered, counted
        return self

    def __exit__(self, *exc: object) -> None:
        b._Kit.array, b._Session.execute = self.saved


def gate_pieces(runs: int, backend: str = "native") -> dict[str, float]:
    """Where a warm default gate's time goes, as medians over ``runs``
    gates (ms): each piece timed on the calling thread, "the rest" its
    Python and the system calls no piece names; beside them, how long the
    releasing thread spent tearing down start-up VMs while the gate's clock
    ran (on a one-vCPU host that shares the gate's CPU)."""
    import statistics

    clock = Pieces()
    clocked, spent = clock.clocked, clock.spent
    jobs: list[tuple[int, int]] = []  # the releasing thread's teardowns: (start, end)

    def watched(release: Any) -> Any:
        def job() -> None:
            start = time.perf_counter_ns()
            try:
                release()
            finally:
                jobs.append((start, time.perf_counter_ns()))

        return job

    runner = b._NativeBackend if backend == "native" else b._PythonBackend
    saved = {
        "execute": runner.execute,
        "kit_releaser": b._Kit.releaser,
        "release_later": b._release_later,
        "loop": b._host_loop(),
        **{name: getattr(b, name) for name in _OS_SEAMS},
    }

    def later(release: Any, fds: Any = ()) -> None:
        saved["release_later"](watched(release), fds)

    def kit_releaser(kit: Any, of: Any) -> Any:
        return clocked("the VM's release", saved["kit_releaser"](kit, of))

    runner.execute = clocked("device work (the arrays)", saved["execute"])
    b._Kit.releaser = kit_releaser
    b._release_later = later
    b._CACHE["host_loop"] = clocked("host loop", saved["loop"])
    for name in _OS_SEAMS:
        what = "device open" if name == "_open_device" else "host reads"
        setattr(b, name, clocked(what, saved[name]))
    pieces: dict[str, list[float]] = {}
    try:
        for _ in range(runs):
            spent.clear()
            del jobs[:]
            start = time.perf_counter_ns()
            try:
                b.SystemCheck.run(backend=backend).close()
            except b.BoxliteError:
                pass
            end = time.perf_counter_ns()
            b._wait_for_closes()
            spent["the rest"] = end - start - sum(spent.values())
            spent["total"] = end - start
            inside = sum(max(0, min(stop, end) - max(began, start)) for began, stop in jobs)
            spent["releasing thread, inside the clock"] = inside
            for name, ns in spent.items():
                pieces.setdefault(name, []).append(ns)
    finally:
        runner.execute, b._Kit.releaser = saved["execute"], saved["kit_releaser"]
        b._release_later, b._CACHE["host_loop"] = saved["release_later"], saved["loop"]
        for name in _OS_SEAMS:
            setattr(b, name, saved[name])
    return {
        name: statistics.median(ns + [0] * (runs - len(ns))) / 1e6 for name, ns in pieces.items()
    }


_TRACING = "/sys/kernel/tracing"
_SYSCALL_NAMES = {
    1: "write",
    3: "close",
    9: "mmap",
    11: "munmap",
    14: "rt_sigprocmask",
    28: "madvise",
}
_SYSCALL_NAMES.update({128: "rt_sigtimedwait", 186: "gettid", 222: "timer_create"})
_SYSCALL_NAMES.update({223: "timer_settime", 226: "timer_delete", 228: "clock_gettime"})
_SYSCALL_NAMES.update({28: "madvise", 63: "uname", 257: "openat", 262: "newfstatat"})


def _traced(path: str, text: str) -> None:
    with open(os.path.join(_TRACING, path), "w") as control:
        control.write(text)


def syscall_split(floor: str, passes: int = 12, settle: float = 0.0) -> str:
    """Where the gate's time goes beside the C floor's, from the kernel's
    own records: ``passes`` of each, alternating, traced with the
    raw_syscalls events of this thread.  For each side, the medians of a
    pass's span, its time inside system calls and outside them (its own
    code: the C's, or our Python and ctypes), and the gate's longest
    stretches outside system calls, each named by the calls around it.
    The C's pass ends where its clock stops (it marks the trace there),
    before its teardown; the gate's releasing thread is parked.  ``settle``
    seconds pass before each pass, both sides alike, off their spans: a
    pass then does not start right after the last one's teardown."""
    import re
    import statistics

    if not os.path.exists(os.path.join(_TRACING, "trace")):
        os.makedirs(_TRACING, exist_ok=True)
        subprocess.run(["mount", "-t", "tracefs", "nodev", _TRACING], check=False)
    if not os.path.exists(os.path.join(_TRACING, "trace_marker")):
        return "no tracefs in this kernel"
    names = {
        value: name
        for name, value in vars(b).items()
        if name.startswith("KVM_") and isinstance(value, int) and value >= 0xAE00  # ioctls
    }
    lib = load_floor(floor, gate_spec("gate"))
    tid = threading.get_native_id()
    events = ("raw_syscalls/sys_enter", "raw_syscalls/sys_exit")
    _traced("trace", "")
    for event in events:
        _traced(f"events/{event}/filter", f"common_pid == {tid}")
        _traced(f"events/{event}/enable", "1")
    marker = os.open(os.path.join(_TRACING, "trace_marker"), os.O_WRONLY | os.O_CLOEXEC)
    lib.gate_floor_mark_stop(marker)  # the C's clock stops: its teardown is left aside
    try:
        _traced("tracing_on", "1")
        for _ in range(passes + 2):  # two warm passes first
            time.sleep(settle)
            os.write(marker, b"pass C\n")
            lib.gate_floor_once_ns()
            time.sleep(settle)
            with Parked(b):
                os.write(marker, b"pass G\n")
                _work("gate", "native")
                os.write(marker, b"pass end\n")
            b._wait_for_closes()
        _traced("tracing_on", "0")
        with open(os.path.join(_TRACING, "trace")) as trace:
            text = trace.read()
    finally:
        lib.gate_floor_mark_stop(-1)
        os.close(marker)
        for event in events:
            _traced(f"events/{event}/enable", "0")
        _traced("trace", "")
    record = re.compile(r" (\d+\.\d+): (\S+): (.*)")
    sides: dict[str, list[tuple[float, list[tuple[str, float, float]]]]] = {"C": [], "G": []}
    side, start, calls, entered = "", 0.0, [], None
    for line in text.splitlines():
        found = record.search(line)
        if not found:
            continue
        at, event, rest = float(found.group(1)) * 1e6, found.group(2), found.group(3)
        if event == "tracing_mark_write":
            if side:  # this pass ends where the next mark is written
                sides[side].append((at - start, calls))
            side = rest.split()[1] if rest.split()[1] in sides else ""
            start, calls, entered = at, [], None
        elif side and event == "sys_enter":
            nr, arg = re.match(r"NR (\d+) \([0-9a-f]+, ([0-9a-f]+)", rest).groups()
            name = _SYSCALL_NAMES.get(int(nr), f"syscall {nr}")
            if int(nr) == 16:
                name = names.get(int(arg, 16), f"ioctl {arg}")
            entered = (name, at)
        elif side and event == "sys_exit" and entered is not None:
            calls.append((entered[0], entered[1] - start, at - start))
            entered = None
    said = []
    for key, label in (("C", "the C's pass"), ("G", "the gate's pass")):
        done = sides[key][2:]
        if not done:
            return "no passes were traced"
        spans = [span for span, _ in done]
        inside = [sum(end - begin for _, begin, end in calls) for _, calls in done]
        said.append(
            f"{label} {statistics.median(spans) / 1e3:.2f} ms, in system calls "
            f"{statistics.median(inside) / 1e3:.2f}, outside them "
            f"{statistics.median(span - ins for span, ins in zip(spans, inside)) / 1e3:.2f} "
            f"({statistics.median(len(calls) for _, calls in done):.0f} calls)"
        )
    # The gate's stretches outside system calls, by place in its pass (the
    # same calls in the same order in every warm pass), longest first.
    gates = [calls for _, calls in sides["G"][2:]]
    count = min(len(calls) for calls in gates)
    # The first, from the pass's start (its mark) to its first call: the
    # gate's Python before it opens the device.
    start = statistics.median(calls[0][1] for calls in gates)
    gaps = [(start, "the pass's start", gates[0][0][0])]
    for index in range(1, count):
        took = statistics.median(calls[index][1] - calls[index - 1][2] for calls in gates)
        gaps.append((took, gates[0][index - 1][0], gates[0][index][0]))
    gaps.sort(reverse=True)
    longest = ", ".join(f"{took:.0f} us {before} -> {after}" for took, before, after in gaps[:6])
    # Inside system calls, by call: the median time per pass each side
    # spends in each, and the calls where the gate spends most beyond the C.
    within: dict[str, dict[str, float]] = {}
    for key in ("C", "G"):
        totals: dict[str, list[float]] = {}
        for _, calls in sides[key][2:]:
            per: dict[str, float] = {}
            for name, begin, end in calls:
                per[name] = per.get(name, 0.0) + end - begin
            for name in set(per) | set(totals):
                totals.setdefault(name, []).append(per.get(name, 0.0))
        within[key] = {name: statistics.median(times) for name, times in totals.items()}
    beyond = sorted(
        ((within["G"].get(n, 0.0) - within["C"].get(n, 0.0), n) for n in within["G"]),
        reverse=True,
    )
    more = ", ".join(
        f"{name} {within['G'][name]:.0f} us against {within['C'].get(name, 0.0):.0f}"
        for _, name in beyond[:5]
    )
    # The call the gate spends most beyond the C in, each time it is made
    # in a pass, in order (medians over the passes).
    top = beyond[0][1]
    each = {}
    for key in ("C", "G"):
        made = [
            [end - begin for name, begin, end in calls if name == top]
            for _, calls in sides[key][2:]
        ]
        times = min(len(m) for m in made)
        each[key] = " ".join(f"{statistics.median(m[i] for m in made):.0f}" for i in range(times))
    return (
        "; ".join(said)
        + f"; the gate's longest stretches outside them: {longest}"
        + f"; inside them, where the gate spends most beyond the C (per pass): {more}"
        + f"; {top} each time (us): the gate {each['G']}, the C {each['C']}"
    )


def gate_ratio(runs: int, engine: str | None = b.DEFAULT_ENGINE) -> tuple[float, float]:
    """(gate ms per run, gate time / native time) with the native backend."""
    try:
        b.SystemCheck.run(backend="native", engine=engine).close()  # warm
    except b.BoxliteError:
        pass
    total = 0
    with NativeShare() as share:
        for _ in range(runs):
            share.open_close()
            start = time.perf_counter_ns()
            try:
                b.SystemCheck.run(backend="native", engine=engine).close()
            except b.BoxliteError:
                pass  # a refusal is timed too
            total += time.perf_counter_ns() - start
    return total / runs / 1e6, total / max(share.ns, 1)


def bench() -> None:
    """The gate against C doing the same work, and against the native work it
    does (all under the same emulator)."""
    floor = os.path.join(HERE, "libgate_floor.so")
    released: float | None = None
    if os.path.exists(floor):
        gate_targets = {"native": "target 1.10x", "python": "target 1.25x"}
        works = (
            ("gate", "default gate", "", 60, "C doing the same work", gate_targets),
            ("check", "check()", "-check", 30, "C doing its KVM work and host reads", {}),
        )
        for work, what, suffix, runs, floor_is, targets in works:
            for backend in ("native", "python"):
                got = floor_ratio(floor, backend, runs=runs, work=work)
                if (work, backend) == ("gate", "native"):
                    released = got.floor_release_ms  # beside gate_pieces' own, below
                target = targets.get(backend, "no target")
                announce(
                    f"bench-floor{suffix}-{backend}",
                    "INFO",
                    f"{what} ({backend}) {got.ms:.2f} ms, {floor_is} {got.floor_ms:.2f} ms: "
                    f"{got.ms / got.floor_ms:.2f}x ({target}; C's runs ended: {got.exits}; "
                    f"KVM_RUN {got.run_ms:.2f} ms, the C's {got.floor_run_ms:.2f} ms)",
                )
    ms, ratio = gate_ratio(20)
    announce("bench", "INFO", f"gate {ms:.2f} ms, {ratio:.2f}x its native work (target 1.15x)")
    pieces = gate_pieces(20)
    said = ", ".join(f"{name} {ms:.2f}" for name, ms in pieces.items())
    if released is not None:
        said += f"; the C floor's release of its guest's VM {released:.2f}"
    announce("bench-pieces", "INFO", f"a warm gate's time (ms, medians of 20): {said}")
    if os.path.exists(floor):
        now, paused = floor_release_paused(floor, 2000)
        announce(
            "bench-teardown",
            "INFO",
            f"the C floor's release of its guest's VM {now:.2f} ms; "
            f"{paused:.2f} ms with 2 ms more between the VM's last use and its teardown",
        )
    if os.path.exists(floor):
        split = syscall_split(floor)
        announce("bench-syscalls", "INFO", f"traced with raw_syscalls (medians): {split}")
        split = syscall_split(floor, settle=0.05)
        announce(
            "bench-syscalls-settled",
            "INFO",
            f"the same, each pass 50 ms after the last one's teardown: {split}",
        )
    ms, ratio = gate_ratio(50, engine=None)
    announce("bench-bare", "INFO", f"bare device check {ms:.2f} ms, {ratio:.2f}x its native work")
    gate_ns = check_ns = 0
    for _ in range(10):
        start = time.perf_counter_ns()
        b.SystemCheck.run().close()
        gate_ns += time.perf_counter_ns() - start
        start = time.perf_counter_ns()
        b.check()
        check_ns += time.perf_counter_ns() - start
        b._wait_for_closes()
    announce(
        "bench-report",
        "INFO",
        f"check() with every engine {check_ns / 1e7:.2f} ms, "
        f"{check_ns / gate_ns:.2f}x the gate (target 1.6x)",
    )


def speed_under_load(runs: int = 100) -> None:
    """The speed probe's verdict holds with a busy loop beside the gate on
    every CPU: a host that runs guests at hardware speed is never called
    emulated because something else wanted the CPU."""
    loops = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(os.cpu_count() or 1)
    ]
    verdicts: dict[str, int] = {}
    # How many speed samples each gate took: more than one where the first
    # looked emulated (a stall), which the later, longer runs must undo.
    slope, taken = b._guest_slope, [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        taken[-1] += 1
        return slope(*args, **kwargs)

    start = time.monotonic()
    b._guest_slope = counted
    try:
        time.sleep(0.2)
        for _ in range(runs):
            try:
                b.SystemCheck.run().close()
                said = "usable"
            except b.BoxliteError as err:
                said = err.cause
            verdicts[said] = verdicts.get(said, 0) + 1
            taken.append(0)
    finally:
        b._guest_slope = slope
        for loop in loops:
            loop.kill()
            loop.wait()
    emulated = sum(n for cause, n in verdicts.items() if cause.startswith("guest-emulated"))
    per_gate = {n: taken[:-1].count(n) for n in sorted(set(taken[:-1]))}
    case(
        "speed-under-load",
        verdicts == {"usable": runs},
        f"{runs} gates beside {len(loops)} busy loop(s) in {time.monotonic() - start:.1f} s: "
        f"{verdicts}; {emulated} called emulated; speed samples per gate {per_gate}",
    )


def without_svm() -> None:
    try:
        b.SystemCheck.run()
    except b.UnsupportedError as err:
        ok = err.cause in (
            ("kvm-no-nested", "kvm-no-virtualization") if LONG_MODE else ("kvm-no-el2",)
        )
        case("no-kvm-diagnosed", ok, f"{err.cause}: {str(err).splitlines()[0]}")
        return
    case("no-kvm-diagnosed", False, "the gate passed on a CPU without SVM")


BOX = r"""
import asyncio, sys, time
import boxlite

def step(what, start):
    print(f"BOX-STEP {what} at {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)

async def attempt():
    start = time.monotonic()
    runtime = boxlite.Boxlite(boxlite.Options(home_dir="/tmp/box-home"))
    step("runtime made", start)
    options = boxlite.BoxOptions(rootfs_path="/oci", cpus=1, memory_mib=256, auto_remove=True)
    box = await runtime.create(options)
    step("box created", start)
    await box.start()
    step("box started", start)
    execution = await box.exec("echo", ["hello-from-guest"])
    said = [line if isinstance(line, str) else line.decode() async for line in execution.stdout()]
    result = await execution.wait()
    print(f"BOX-SAID {''.join(said).strip()!r} exit {result.exit_code} "
          f"after {time.monotonic() - start:.1f} s", flush=True)

asyncio.run(attempt())
"""


def box_cases() -> None:
    """The ground truth with the real engine: a BoxLite box starts here and
    runs echo, and the gate says usable; both with the same KVM."""
    # Progress on the console: a host that stops from here on is seen to
    # have run Python, and whether it stopped in the gate or in the box.
    print("BOX-STEP the cases started; the gate runs", flush=True)
    try:
        with b.SystemCheck.run() as host:
            case("box-gate", True, host.describe())
    except b.BoxliteError as err:
        case("box-gate", False, f"{err.cause}: {err.summary}")
    env = {**os.environ, "XDG_DATA_HOME": "/xdg", "HOME": "/tmp"}
    try:  # its progress goes to the console as it happens
        done = subprocess.run(
            [sys.executable, "-c", BOX], stdout=subprocess.PIPE, text=True, env=env, timeout=300
        )
    except subprocess.TimeoutExpired:
        case("box-echo", False, "the box did not answer within 300 s")
        return
    said = [line for line in done.stdout.splitlines() if line.startswith("BOX-SAID ")]
    ok = bool(said) and "'hello-from-guest' exit 0" in said[0]
    detail = (
        said[0][len("BOX-SAID ") :] if said else f"exit {done.returncode}: {done.stderr[-600:]}"
    )
    case("box-echo", ok, f"BoxLite {getattr(__import__('boxlite'), '__version__', '?')}: {detail}")


def main() -> None:
    faulthandler.dump_traceback_later(CASE_LIMIT, exit=True)
    if sys.argv[1:] == ["box"]:
        box_cases()
        return
    if os.path.exists("/dev/kvm"):
        with_svm()
    else:
        guarded("no-kvm-diagnosed", without_svm)


if __name__ == "__main__":
    main()
