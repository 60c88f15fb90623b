"""`make bench`: the check against the kernel's floor and the tools people use.

Standard library only.  Prints one table from one run on this host: each
figure is the median over the repetitions, with min and max.  Targets are
reported, never asserted.  `--stress` runs the stress test instead.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clocks import Parked  # noqa: E402
from guest_cases import floor_ratio, gate_ratio  # noqa: E402
from vmhost import GATE_FLOOR_LIBRARY  # noqa: E402

import boxlite_syscheck as b  # noqa: E402


def summary(samples_ns: list[float]) -> tuple[float, float, float]:
    ms = [s / 1e6 for s in samples_ns]
    return statistics.median(ms), min(ms), max(ms)


def timed(call, n: int) -> list[float]:
    out = []
    for _ in range(n):
        with Parked(b):  # the check's teardowns after the clock (settle)
            start = time.perf_counter_ns()
            call()
            out.append(time.perf_counter_ns() - start)
        settle()
    return out


FLOOR_SETTLES: list[Callable[[], None]] = []


def settle() -> None:
    """Tear down the VMs the last call left for later, off the clock: the
    check leaves its guest's teardown to its releasing thread, parked while
    the clock runs (clocks.Parked), and the C floors leave theirs for this
    (each must wait for its own, or the next call, of either kind, would
    bear it)."""
    b._wait_for_closes()
    for call in FLOOR_SETTLES:
        call()


def wall(argv: list[str], n: int, **kwargs) -> tuple[list[float], subprocess.CompletedProcess[str]]:
    out = []
    done = None
    for _ in range(n):
        start = time.perf_counter_ns()
        done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
        out.append(time.perf_counter_ns() - start)
    assert done is not None
    return out, done


def bare_samples(
    floor: tuple[str, Callable[[], None]], n: int, rounds: int = 40
) -> tuple[int, dict[str, list[float]]]:
    """The bare device check in C (tests/bench_floor.c) and with each backend,
    interleaved so that the host's drift (large here) falls on all alike:
    ``rounds`` rounds, each n/rounds runs of the C program, then as many
    passes of the C inside this process, the native and the Python check,
    one of each in turn.  (Under load this host's VM teardown stalls for
    seconds at a time, 0.9 ms becoming 4 ms: in blocks of 200 one kind
    could take a stall the next one missed.)

    All of it runs on one CPU, the C program too (it inherits this
    process's affinity): on this host the same C's VM costs about 10% more
    on one vCPU than on the other, so a C program the scheduler put on the
    other CPU measured the placement, not our overhead.  Each round also
    times the C inside this process on each other CPU, for the rows that
    show what the placement costs.  Returns the CPU the rows ran on and
    the samples."""

    def bare(kind: str) -> None:
        b.SystemCheck.run(backend=kind, engine=None).close()

    allowed = os.sched_getaffinity(0)
    one, *others = sorted(allowed)
    samples: dict[str, list[float]] = {"floor": [], "in-process": [], "native": [], "python": []}
    samples.update({f"cpu {cpu}": [] for cpu in others})
    per = max(1, n // rounds)
    exe, in_process = floor
    calls: dict[str, Callable[[], None]] = {
        "in-process": in_process,
        "native": lambda: bare("native"),
        "python": lambda: bare("python"),
    }
    for call in calls.values():
        call()  # warm: library loaded, imports done
        settle()
    try:
        for _ in range(rounds):
            os.sched_setaffinity(0, {one})
            done = subprocess.run([exe, str(per)], capture_output=True, text=True, check=True)
            samples["floor"] += [float(line) for line in done.stdout.split()]
            for _ in range(per):
                for kind, call in calls.items():
                    with Parked(b):
                        start = time.perf_counter_ns()
                        call()
                        samples[kind].append(time.perf_counter_ns() - start)
                    settle()
            for cpu in others:
                os.sched_setaffinity(0, {cpu})
                samples[f"cpu {cpu}"] += timed(in_process, per)
    finally:
        os.sched_setaffinity(0, allowed)
    return one, samples


def bare_floor() -> tuple[str, Callable[[], None]]:
    """tests/bench_floor.c built in build/: the program, and the same C as a
    library function called inside this interpreter."""
    exe = build_c("bench_floor.c", "bench_floor")
    lib = build_c(
        "bench_floor.c", "libbench_floor.so", "-shared", "-fPIC", "-Dmain=bench_floor_main"
    )
    loaded = ctypes.CDLL(lib)
    once: Callable[[], None] = loaded.bench_floor_once
    FLOOR_SETTLES.append(loaded.bench_floor_settle)
    return exe, once


def build_c(source: str, name: str, *flags: str) -> str:
    """Compile tests/``source`` to build/``name``; return its path."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench: needs a C compiler for the floor")
    out = ROOT / "build" / name
    out.parent.mkdir(exist_ok=True)
    argv = [cc, "-O2", "-Wall", "-Wextra", *flags, "-o", str(out), str(ROOT / "tests" / source)]
    subprocess.run(argv, check=True)
    return str(out)


def own_python_rows(in_process: Callable[[], None], n: int) -> list[tuple[str, ...]]:
    """Where the native bare check's time beyond the C goes.  Its one
    foreign call that does the device's work is replayed (the outcome and
    registers a real run left, copied back), so what is timed is the
    check's own Python and its descriptor's open and close: back to back,
    and right after the C inside this process has made, run and torn down
    a real VM, as every real check comes after one."""
    real = b._NativeBackend.execute

    def check() -> None:
        b.SystemCheck.run(backend="native", engine=None).close()

    check()
    (kit,) = b._CACHE["kits"][id(b._guest("real-mode"))]
    kept = bytes(kit.out), bytes(kit.regs)  # what the real run just left

    def replay(self: object, ops: object, count: int, state: object, out: object) -> None:
        ctypes.memmove(ctypes.addressof(out), kept[0], len(kept[0]))
        ctypes.memmove(ctypes.addressof(kit.regs), kept[1], len(kept[1]))

    alone, after, floor, real_checks = [], [], [], []
    b._NativeBackend.execute = replay
    try:
        check()  # a replay that did not pass would raise here
        for _ in range(max(1, n // 20)):
            alone += timed(check, 10)
            for _ in range(10):
                in_process()
                settle()
                with Parked(b):
                    start = time.perf_counter_ns()
                    check()
                    after.append(time.perf_counter_ns() - start)
            b._NativeBackend.execute = real
            floor += timed(in_process, 10)
            real_checks += timed(check, 10)
            b._NativeBackend.execute = replay
    finally:
        b._NativeBackend.execute = real
    gap = summary(real_checks)[0] - summary(floor)[0]
    warm, cold = summary(alone)[0], summary(after)[0]
    return [
        (
            "bare check, native, device work replayed",
            f"{warm:.3f}",
            f"{min(alone) / 1e6:.3f}",
            f"{max(alone) / 1e6:.3f}",
            "",
            "its own Python, open and close, back to back",
        ),
        (
            "the same, right after the C's real VM",
            f"{cold:.3f}",
            f"{min(after) / 1e6:.3f}",
            f"{max(after) / 1e6:.3f}",
            f"{cold / warm:.2f}x",
            f"vs back to back; the real check less the C inside this process: {gap:.3f} ms",
        ),
    ]


def gate_floor() -> str:
    """tests/gate_floor.c built in build/ as a library (the C doing the
    default gate's work, called in this process: guest_cases.floor_ratio)."""
    return build_c("gate_floor.c", "libgate_floor.so", *GATE_FLOOR_LIBRARY)


def per_ioctl_rows() -> list[tuple[str, ...]]:
    """Each backend's cost per operation: one array of 200 KVM_CHECK_EXTENSION
    ioctls on /dev/kvm, against the same ioctls from C (os.ioctl's floor is
    the system call itself, so the ratio is the backend's own cost)."""
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        abi = b._abi()
        plan = b._Plan()
        for _ in range(200):
            plan.ioctl(b.STEP_CHECK_EXTENSION, b._KVM, b.KVM_CHECK_EXTENSION, 1)
        ops, count = plan.build()
        rows = []
        for name in ("native", "python"):
            runner = b._backend_for(name)
            state, out = abi.State(), abi.Outcome()
            state.fds[:] = [fd] + [-1] * (b._FD_SLOTS - 1)

            def one_array(runner=runner, state=state, out=out) -> None:
                runner.execute(ops, count, state, out)

            samples = timed(one_array, 200)
            med = summary(samples)[0] * 1e3 / count
            rows.append(
                (f"one ioctl, {name} backend", f"{med / 1e3:.4f}", "", "", "", f"{med:.2f} us")
            )
        return rows
    finally:
        os.close(fd)


COLD = """
import sys, time
t0 = time.perf_counter_ns()
import boxlite_syscheck as b
t1 = time.perf_counter_ns()
import ctypes
t2 = time.perf_counter_ns()
b._abi()
t3 = time.perf_counter_ns()
b._load_native()
before = set(sys.modules)
t4 = time.perf_counter_ns()
b.SystemCheck.run(engine=None).close()
t5 = time.perf_counter_ns()
b.SystemCheck.run(engine=None).close()
t6 = time.perf_counter_ns()
print(t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, ",".join(sorted(set(sys.modules) - before)))
"""

# The first call's own pieces, timed inside it: each named function of the
# module wrapped with a clock, in a fresh interpreter whose ctypes, ctypes
# structures and library are already loaded (the rows above), then the
# same for the second call.  "the rest" is the call's time less the pieces:
# its Python, the device's open and close, the diagnosis.
PIECES = """
import json, sys, time
sys.path.insert(0, "tests")
from clocks import Pieces
import boxlite_syscheck as b
import ctypes
b._abi()
b._load_native()
pieces = Pieces()
clocked, spent = pieces.clocked, pieces.spent

def releasing(make):
    def releaser(self, state):
        return clocked("the VMs' release (C)", make(self, state))
    return releaser

N = b._NativeBackend
N.execute = clocked("the device work (C)", N.execute)
N.releaser = releasing(N.releaser)
b._Kit.__init__ = clocked("guest memory and buffers (a kit)", b._Kit.__init__)
b._Kit.array = clocked("operation arrays", b._Kit.array)
b._guest = clocked("the guest's image", b._guest)
b._host_ns_per_iteration = clocked("the host loop", b._host_ns_per_iteration)
b._cpuid_features = clocked("CPUID features decoded", b._cpuid_features)
args = {"engine": None} if sys.argv[1] == "bare" else {}
calls = []
for _ in range(2):
    spent.clear()
    start = time.perf_counter_ns()
    if not calls:
        import mmap  # what the first call imports (the cold row above names it)
        spent["import mmap"] = time.perf_counter_ns() - start
    try:
        b.SystemCheck.run(**args).close()
    except b.BoxliteError:
        pass
    spent["the rest"] = time.perf_counter_ns() - start - sum(spent.values())
    calls.append(dict(spent))
print(json.dumps(calls))
"""


FIRST = """
import time
t0 = time.perf_counter_ns()
import boxlite_syscheck as b
try:
    b.SystemCheck.run({args}).close()
except b.BoxliteError:
    pass
print(time.perf_counter_ns() - t0)
"""


def cold_rows(python: str, n: int) -> list[tuple[str, ...]]:
    """What the first call pays, piece by piece, each in a fresh interpreter
    (site included, bytecode cached, as users run it)."""
    subprocess.run([python, "-m", "py_compile", str(ROOT / "boxlite_syscheck.py")], check=True)
    pieces: list[list[float]] = [[] for _ in range(6)]
    first_imports = ""
    # With site, as this interpreter starts; with -S, a lean start such as
    # Debian's python3, whose site loads none of the modules a check uses
    # (this host's site loads certifi, threading, functools and more).
    firsts: dict[tuple[str, str], list[float]] = {
        (flags, args): [] for flags in ("", "-S") for args in ("engine=None", "")
    }
    for _ in range(n):
        done = subprocess.run(
            [python, "-c", COLD], cwd=ROOT, capture_output=True, text=True, check=True
        )
        *values, first_imports = done.stdout.split()
        for piece, value in zip(pieces, values):
            piece.append(float(value))
        for (flags, args), got in firsts.items():
            done = subprocess.run(
                [python, *filter(None, [flags]), "-c", FIRST.format(args=args)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            got.append(float(done.stdout))
    names = (
        "cold: import boxlite_syscheck",
        "cold: import ctypes",
        "cold: the ctypes structures (_abi)",
        "cold: load libkvmsmoke.so",
        "cold: first SystemCheck.run(engine=None), rest",
        "warm: second SystemCheck.run(engine=None)",
    )
    rows = []
    for name, samples in zip(names, pieces):
        med, lo, hi = summary(samples)
        note = "fresh interpreter"
        if name.startswith("cold: first"):
            note += f"; it imports {first_imports.replace(',', ', ')}"
        rows.append((name, f"{med:.3f}", f"{lo:.3f}", f"{hi:.3f}", "", note))
    rows += first_call_rows(python, n)
    for (flags, args), samples in firsts.items():
        med, lo, hi = summary(samples)
        what = f"first SystemCheck.run({args}), fresh process" + (
            f", python {flags}" if flags else ""
        )
        note = "import included; target 5 ms (BoxLite 0.9.1's runtime constructor, cold)"
        rows.append((what, f"{med:.3f}", f"{lo:.3f}", f"{hi:.3f}", "", note))
    rows += boxlite_rows(n)
    return rows


def first_call_rows(python: str, n: int) -> list[tuple[str, ...]]:
    """The first call's pieces (PIECES), each beside the second call's."""
    rows = []
    for kind, what in (("bare", "SystemCheck.run(engine=None)"), ("gate", "SystemCheck.run()")):
        firsts: dict[str, list[float]] = {}
        seconds: dict[str, list[float]] = {}
        for _ in range(n):
            done = subprocess.run(
                [python, "-c", PIECES, kind], cwd=ROOT, capture_output=True, text=True, check=True
            )
            first, second = json.loads(done.stdout)
            for piece, ns in first.items():
                firsts.setdefault(piece, []).append(ns)
                seconds.setdefault(piece, []).append(second.get(piece, 0))
        for piece, samples in firsts.items():
            med, lo, hi = summary(samples)
            warm = summary(seconds[piece])[0]
            note = f"the second call: {warm:.3f} ms"
            rows.append(
                (f"cold: first {what}: {piece}", f"{med:.3f}", f"{lo:.3f}", f"{hi:.3f}", "", note)
            )
    return rows


BOXLITE = """
import sys, time
t0 = time.perf_counter_ns()
import boxlite
t1 = time.perf_counter_ns()
boxlite.Boxlite(boxlite.Options(home_dir=sys.argv[1]))
t2 = time.perf_counter_ns()
print(t1 - t0, t2 - t1)
"""


def boxlite_rows(n: int) -> list[tuple[str, ...]]:
    """BoxLite 0.9.1's own start, cold, for comparison (where the tests have
    installed its SDK: tests/boxlite_sdk.py)."""
    python = Path("/tmp/boxlite-sdk-0.9.1/bin/python")
    if not python.exists():
        return [("BoxLite 0.9.1 runtime constructor", "-", "-", "-", "", "run make test first")]
    imports, makes = [], []
    home = tempfile.mkdtemp(prefix="bench-boxlite-")  # made by the first run, kept
    for _ in range(n + 1):
        done = subprocess.run([str(python), "-c", BOXLITE, home], capture_output=True, text=True)
        if done.returncode != 0 or len(done.stdout.split()) != 2:
            return [("BoxLite 0.9.1 runtime constructor", "-", "-", "-", "", done.stderr[-80:])]
        first, second = done.stdout.split()
        imports.append(float(first))
        makes.append(float(second))
    shutil.rmtree(home, ignore_errors=True)
    imports, makes = imports[1:], makes[1:]  # the first run made the home directory
    rows = []
    made = (("import boxlite", imports), ("Boxlite(Options(...)), its home made", makes))
    for name, samples in made:
        med, lo, hi = summary(samples)
        what = f"BoxLite 0.9.1: {name}, fresh process"
        rows.append((what, f"{med:.3f}", f"{lo:.3f}", f"{hi:.3f}", "", "for comparison"))
    return rows


def import_time(python: str, n: int) -> tuple[list[float], list[str]]:
    # Write the bytecode first: PYTHONDONTWRITEBYTECODE would otherwise make
    # every fresh interpreter compile the module again, which is not import.
    subprocess.run([python, "-m", "py_compile", str(ROOT / "boxlite_syscheck.py")], check=True)
    samples = []
    code = "import boxlite_syscheck"
    for _ in range(n):
        done = subprocess.run(
            [python, "-S", "-X", "importtime", "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        for line in done.stderr.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) == 3 and parts[2] == "boxlite_syscheck":
                samples.append(float(parts[1]) * 1000)  # cumulative µs -> ns
    probe = (
        "import sys; before = set(sys.modules); import boxlite_syscheck; "
        "print(' '.join(sorted(set(sys.modules) - before - {'boxlite_syscheck'})))"
    )
    done = subprocess.run(
        [python, "-S", "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return samples, done.stdout.split()


def cli_rows(python: str, n: int) -> list[tuple[str, ...]]:
    """The command against a bare interpreter start, as users run both
    (site included, bytecode cached), interleaved so that noise falls on
    both alike; then the same under a busy loop on 2 CPUs.  The ratio is
    the median of each turn's command over the bare start just before it:
    this host's noise comes in spells of seconds, which a ratio of two
    medians lets fall on one side only."""
    subprocess.run([python, "-m", "py_compile", str(ROOT / "boxlite_syscheck.py")], check=True)
    command = [python, "-m", "boxlite_syscheck", "-q"]
    commands = {
        "python -c pass": [python, "-c", "pass"],
        "python -m boxlite_syscheck -q": command,
        "python -m boxlite_syscheck -q --engine none": [*command, "--engine", "none"],
    }
    rows: list[tuple[str, ...]] = []
    for load in (0, 2):
        samples: dict[str, list[float]] = {name: [] for name in commands}
        codes: dict[str, int] = {}
        with busy(load):
            for _ in range(n):
                for name, argv in commands.items():
                    start = time.perf_counter_ns()
                    done = subprocess.run(argv, cwd=ROOT, capture_output=True)
                    samples[name].append(time.perf_counter_ns() - start)
                    codes[name] = done.returncode
        bare = samples["python -c pass"]
        where = "quiet" if not load else f"{load} CPUs busy"
        target = "1.25x" if not load else "1.5x"
        for name, got in samples.items():
            med, lo, hi = summary(got)
            if name == "python -c pass":
                rows.append(
                    (f"{name} ({where})", f"{med:.3f}", f"{lo:.3f}", f"{hi:.3f}", "", "baseline")
                )
                continue
            paired = statistics.median(ns / start for ns, start in zip(got, bare))
            note = f"vs the bare start beside it, median of {n} turns, target {target}"
            rows.append(
                (
                    f"{name} ({where})",
                    f"{med:.3f}",
                    f"{lo:.3f}",
                    f"{hi:.3f}",
                    f"{paired:.2f}x",
                    f"{note}; exit {codes[name]}",
                )
            )
    return rows


def pvh_elf(kernel: Path, out: Path) -> None:
    """libkrunfw's raw kernel as an ELF with a PVH entry note, which QEMU's
    -kernel boots directly (its entry, pvh_start_xen, is at the load address)."""
    import ctypes
    import mmap

    opened = b.open_kernel(str(kernel))
    mem = mmap.mmap(-1, opened.end)
    anchor = ctypes.c_char.from_buffer(mem)
    opened.copy_into(mem, ctypes.addressof(anchor))
    del anchor
    image = bytes(mem[opened.load : opened.end])
    opened.close()
    mem.close()

    def u(value: int, size: int) -> bytes:
        return value.to_bytes(size, "little")

    # XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen", the 32-bit entry address.
    note = u(4, 4) + u(4, 4) + u(18, 4) + b"Xen\0" + u(opened.load, 4)
    at = 4096

    def phdr(kind: int, offset: int, paddr: int, size: int, align: int) -> bytes:
        flags = 7 if kind == 1 else 4
        return (
            u(kind, 4) + u(flags, 4) + u(offset, 8) + u(paddr, 8) * 2 + u(size, 8) * 2 + u(align, 8)
        )

    head = b"\x7fELF\x02\x01\x01" + bytes(9) + u(2, 2) + u(62, 2) + u(1, 4) + u(opened.load, 8)
    head += u(64, 8) + bytes(8) + bytes(4) + u(64, 2) + u(56, 2) + u(2, 2) + bytes(6)
    table = phdr(1, at, opened.load, len(image), 4096) + phdr(4, 64 + 2 * 56, 0, len(note), 4)
    data = head + table + note
    out.write_bytes(data + bytes(at - len(data)) + image)


def deep_rows() -> list[tuple[str, ...]]:
    """The deep boot in the emulated-SVM host (from the last make
    test-x86-nested) against QEMU's emulator booting the same kernel
    directly here: both are QEMU's TCG underneath."""
    import json

    log = ROOT / "build" / "nested" / "svm.log"
    lines = (
        [line for line in log.read_text(errors="replace").splitlines() if "DEEP-BOOT " in line]
        if log.exists()
        else []
    )
    if not lines or shutil.which("qemu-system-x86_64") is None:
        return [("deep boot, nested host", "-", "-", "-", "", "run `make test-x86-nested` first")]
    deep = json.loads(lines[-1].split("DEEP-BOOT ", 1)[1])
    reset = deep["milestones_s"].get("reset")
    sys.path.insert(0, str(ROOT / "tests"))
    import boxlite_sdk

    with tempfile.TemporaryDirectory() as tmp:
        elf = Path(tmp) / "libkrunfw-pvh.elf"
        pvh_elf(boxlite_sdk.extracted_libkrunfw(), elf)
        machine = ["-accel", "tcg", "-M", "microvm", "-cpu", "EPYC", "-m", "64"]
        cmdline = "console=ttyS0 reboot=t panic=-1"  # the kernel has no 8250: silent
        boot = ["-kernel", str(elf), "-append", cmdline, "-nographic", "-no-reboot"]
        command = ["qemu-system-x86_64", *machine, *boot]
        samples, _ = wall(command, 3, timeout=120)
    qemu = summary(samples)[0] / 1e3
    first = deep["milestones_s"].get("first-output")
    return [
        (
            "QEMU TCG boots libkrunfw to its reset",
            f"{qemu * 1e3:.0f}",
            "",
            "",
            "",
            "whole QEMU process, here",
        ),
        (
            "deep boot in the nested host, to reset",
            f"{reset * 1e3:.0f}" if reset else "-",
            "",
            "",
            f"{reset / qemu:.2f}x" if reset else "",
            f"target 2x; first output at {first * 1e3:.0f} ms; {deep['kvm_exits']} KVM exits"
            if first
            else deep["outcome"],
        ),
    ]


class busy:  # noqa: N801 - a context manager, used as a statement
    """A busy loop on ``cpus`` CPUs (processes, so the GIL does not matter)."""

    def __init__(self, cpus: int) -> None:
        self.cpus = cpus
        self.loops: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> busy:
        code = "while True: pass"
        self.loops = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.cpus)]
        time.sleep(0.2 if self.cpus else 0)
        return self

    def __exit__(self, *exc: object) -> None:
        for loop in self.loops:
            loop.kill()
            loop.wait()


def row(rows, name, samples, floor_median=None, note=""):
    med, lo, hi = summary(samples)
    ratio = f"{med / floor_median:.2f}x" if floor_median else ""
    rows.append((name, f"{med:.3f}", f"{lo:.3f}", f"{hi:.3f}", ratio, note))


def bench(n: int) -> list[tuple[str, ...]]:
    python = sys.executable
    rows: list[tuple[str, ...]] = []
    floor = bare_floor()
    cpu, bare = bare_samples(floor, n)
    floor_median = summary(bare["floor"])[0]
    row(
        rows, "floor: C bare device check (raw ioctls)", bare["floor"], None, f"n={n}; on CPU {cpu}"
    )
    note = "the same C, called in this interpreter in turn with the checks, on the same CPU"
    row(rows, "floor: the same C inside this process", bare["in-process"], floor_median, note)
    inside = summary(bare["in-process"])[0]
    for kind in sorted(k for k in bare if k.startswith("cpu ")):
        note = f"vs the line above (CPU {cpu}): what the placement alone costs the kernel's calls"
        row(
            rows,
            f"floor: the same C inside this process on {kind.upper()}",
            bare[kind],
            inside,
            note,
        )
    for backend in ("native", "python"):
        target = "1.10x" if backend == "native" else "1.25x"
        ours = summary(bare[backend])[0] / inside
        note = f"target {target}; interleaved with the C; {ours:.2f}x the C inside this process"
        row(rows, f"SystemCheck.run(engine=None) {backend}", bare[backend], floor_median, note)
    rows += own_python_rows(floor[1], n // 5)

    def gate() -> None:
        try:
            b.SystemCheck.run().close()
        except b.BoxliteError:
            pass

    gate()
    samples = timed(gate, max(20, n // 20))
    verdict = "passes" if _gate_passes() else "refuses"
    ms, share = gate_ratio(max(20, n // 20))
    row(
        rows,
        "SystemCheck.run() default gate",
        samples,
        None,
        f"{verdict}; {share:.2f}x its native work",
    )
    exe = gate_floor()
    gate_targets = {"native": "target 1.10x", "python": "target 1.25x"}
    works = (
        ("gate", "the default gate", "SystemCheck.run() default gate", 300, gate_targets),
        ("check", "check()", "check() full report", 100, {}),
    )
    for work, what, name, runs, targets in works:
        for backend in ("native", "python"):
            got = floor_ratio(exe, backend, runs=runs, work=work)
            ms, floor_ms, exits = got.ms, got.floor_ms, got.exits
            if backend == "native":
                rows.append(
                    (
                        f"floor: C doing {what}'s work",
                        f"{floor_ms:.3f}",
                        "",
                        "",
                        "",
                        f"raw ioctls and host reads, its own runs, in this process; {exits}",
                    )
                )
            none = "no target: its text and every engine's verdict are ours"
            target = targets.get(backend, none)
            rows.append(
                (
                    f"{name}, {backend}",
                    f"{ms:.3f}",
                    "",
                    "",
                    f"{ms / floor_ms:.2f}x",
                    f"vs the C above, alternating pass by pass; {target}; "
                    f"KVM_RUN {got.run_ms:.2f} ms, the C's {got.floor_run_ms:.2f} ms",
                )
            )
    rows += per_ioctl_rows()
    imports, modules = import_time(python, 30)
    row(
        rows,
        "import (python -S, fresh)",
        imports,
        None,
        f"target 2.5 ms; imports: {', '.join(modules) or 'nothing new'}",
    )
    rows += cold_rows(python, 15)
    rows += cli_rows(python, 30)
    for name, argv in (
        ("kvm-ok", ["kvm-ok"]),
        ("virt-host-validate qemu", ["virt-host-validate", "qemu"]),
    ):
        exe = shutil.which(argv[0]) or (
            f"/usr/sbin/{argv[0]}" if os.path.exists(f"/usr/sbin/{argv[0]}") else None
        )
        if exe is None:
            rows.append((name, "-", "-", "-", "", "not installed"))
            continue
        samples, done = wall([exe, *argv[1:]], 10)
        said = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        verdict = f"exit {done.returncode}: {said[-1].strip()[:60] if said else ''}"
        if name.startswith("virt"):
            kvm = [line for line in said if "hardware virtualization" in line]
            verdict = (
                f"exit {done.returncode}: {kvm[0].split(' : ', 1)[-1].strip()[:60] if kvm else ''}"
            )
        med, lo, hi = summary(samples)
        rows.append((name, f"{med:.3f}", f"{lo:.3f}", f"{hi:.3f}", "", verdict))
    rows += deep_rows()
    nested = ROOT / "build" / "nested" / "svm.log"
    if nested.exists():
        for line in nested.read_text(errors="replace").splitlines():
            if "CASE bench" in line:
                rows.append(
                    (
                        "nested SVM host (last make test-x86-nested)",
                        "-",
                        "-",
                        "-",
                        "",
                        line.split("INFO", 1)[-1].strip(),
                    )
                )
    else:
        rows.append(("nested SVM host", "-", "-", "-", "", "run `make test-x86-nested` first"))
    return rows


def table(rows: list[tuple[str, ...]], title: str) -> None:
    header = ("what", "median ms", "min ms", "max ms", "ratio", "note")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    print(f"{title}: host {os.uname().nodename}, kernel {os.uname().release}, ", end="")
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])


def load_effect(quiet: list[tuple[str, ...]], loaded: list[tuple[str, ...]]) -> None:
    """Each ratio under load against the same ratio quiet (target: within 1.25x)."""
    before = {r[0]: r[4] for r in quiet if r[4].endswith("x")}
    print("load effect: each ratio with a busy loop on every CPU / the same ratio quiet")
    for r in loaded:
        if r[0] in before and r[4].endswith("x"):
            effect = float(r[4][:-1]) / float(before[r[0]][:-1])
            verdict = "met" if effect <= 1.25 else "MISSED"
            if r[0].startswith("floor:"):
                verdict = "the host's C: no target"
            print(f"  {r[0]}: {before[r[0]]} -> {r[4]}: {effect:.2f}x (target 1.25x, {verdict})")


def _gate_passes() -> bool:
    try:
        b.SystemCheck.run().close()
    except b.BoxliteError:
        return False
    return True


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def stress(count: int, threads: int) -> int:
    failures: list[str] = []
    for backend in ("native", "python"):
        b.SystemCheck.run(backend=backend, engine=None).close()
        before = (fds(), rss_kib())
        start = time.monotonic()
        for _ in range(count):
            try:
                b.SystemCheck.run(backend=backend, engine=None).close()
            except b.BoxliteError as err:
                failures.append(f"{backend}: {err.cause}")
        took = time.monotonic() - start
        after = (fds(), rss_kib())
        print(
            f"{backend}: {count} consecutive checks in {took:.2f} s; descriptors "
            f"{before[0]} -> {after[0]}, RSS {before[1]} -> {after[1]} KiB"
        )

        def worker(kind: str = backend) -> None:
            for _ in range(count // threads):
                try:
                    b.SystemCheck.run(backend=kind, engine=None).close()
                except b.BoxliteError as err:
                    failures.append(f"{kind} thread: {err.cause}")

        start = time.monotonic()
        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        took = time.monotonic() - start
        print(
            f"{backend}: {threads} threads x {count // threads} checks at once in "
            f"{took:.2f} s; descriptors {after[0]} -> {fds()}, RSS {after[1]} -> {rss_kib()} KiB"
        )
    print(f"failures: {len(failures)}" + (f" ({failures[:5]})" if failures else ""))
    return 1 if failures else 0


COUNTED = """
import sys
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
engine = None if sys.argv[3] == "none" else b.DEFAULT_ENGINE
if sys.argv[3] == "through":
    # The gate along the path of a host whose guest runs at speed: the host
    # loop said slower than this host's emulated guest, the short runs'
    # noise bound raised, so the long runs and the final run are made.
    b._host_ns_per_iteration = lambda iterations: (1e4, "")
    b._SPEED_SLOW_NS = 1 << 40
for _ in range(2 + int(sys.argv[4])):  # two to warm up, then the counted ones
    try:
        b.SystemCheck.run(backend=sys.argv[2], engine=engine).close()
    except b.BoxliteError:
        pass
b._wait_for_closes()
"""


def _instructions(where: str, backend: str, engine: str, gates: int) -> int | None:
    """User-space instructions of ``gates`` checks (callgrind, whatever the
    host's noise): a run with them less a run without."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return None
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # the module's bytecode, cached
    subprocess.run([sys.executable, "-m", "py_compile", f"{where}/boxlite_syscheck.py"], check=True)
    total = []
    for count in (0, gates):
        with tempfile.NamedTemporaryFile() as out:
            argv = [valgrind, "--tool=callgrind", f"--callgrind-out-file={out.name}"]
            argv += [sys.executable, "-c", COUNTED, where, backend, engine, str(count)]
            subprocess.run(argv, capture_output=True, env=env, check=True)
            summary = next(
                line
                for line in Path(out.name).read_text().splitlines()
                if line.startswith("summary:")
            )
            total.append(int(summary.split()[1]))
    return (total[1] - total[0]) // gates


ALTERNATE = """
import importlib.util, statistics, sys, time
mods = []
for name, where in (("old", sys.argv[1]), ("new", sys.argv[2])):
    spec = importlib.util.spec_from_file_location(f"syscheck_{name}", f"{where}/boxlite_syscheck.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    mods.append(mod)
backend, n = sys.argv[3], int(sys.argv[5])
times = [[], []]
for i in range(n + 5):
    for mod, got in zip(mods, times):
        engine = None if sys.argv[4] == "none" else mod.DEFAULT_ENGINE
        start = time.perf_counter_ns()
        try:
            mod.SystemCheck.run(backend=backend, engine=engine).close()
        except mod.BoxliteError:
            pass
        if i >= 5:
            got.append(time.perf_counter_ns() - start)
        mod._wait_for_closes()  # each waits for its own VMs, off the clock
print(statistics.median(times[0]), statistics.median(times[1]))
"""


def against(revision: str) -> int:
    """This module against the one at ``revision``: both loaded side by side
    in one process, alternating check by check (the host's drift falls on
    both alike), and the instructions each runs."""
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        old.mkdir()
        # Its own library, built by its own Makefile: the ABI may differ.
        for name in ("boxlite_syscheck.py", "kvm_smoke.c", "Makefile"):
            shown = ["git", "show", f"{revision}:{name}"]
            text = subprocess.run(shown, cwd=ROOT, capture_output=True, text=True, check=True)
            (old / name).write_text(text.stdout)
        subprocess.run(["make", "-s", "-C", str(old), "libkvmsmoke.so"], check=True)
        new = Path(tmp) / "new"
        new.mkdir()
        shutil.copy(ROOT / "boxlite_syscheck.py", new / "boxlite_syscheck.py")
        shutil.copy(ROOT / "libkvmsmoke.so", new / "libkvmsmoke.so")
        print(f"{revision} against the working tree")
        for backend in ("native", "python"):
            for engine, n in (("libkrun", 200), ("none", 600)):
                what = f"{'default gate' if engine == 'libkrun' else 'bare check'}, {backend}"
                done = subprocess.run(
                    [sys.executable, "-c", ALTERNATE, str(old), str(new), backend, engine, str(n)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                was, now = (float(x) / 1e6 for x in done.stdout.split())
                counts = [_instructions(str(d), backend, engine, 20) for d in (old, new)]
                counted = (
                    f"{counts[0]:,} -> {counts[1]:,} instructions ({counts[1] / counts[0] - 1:+.0%})"
                    if None not in counts
                    else "no valgrind: no instruction counts"
                )
                print(f"  {what}: {was:.3f} -> {now:.3f} ms ({now / was - 1:+.1%}); {counted}")
            # Instructions only: here its long runs are emulated, and they
            # would be most of any time.
            counts = [_instructions(str(d), backend, "through", 10) for d in (old, new)]
            if None not in counts:
                change = f"{counts[0]:,} -> {counts[1]:,} instructions ({counts[1] / counts[0] - 1:+.0%})"
                print(f"  default gate through the final run, {backend}: {change}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000, help="repetitions of in-process figures")
    parser.add_argument("--stress", action="store_true", help="run the stress test instead")
    parser.add_argument(
        "--load", action="store_true", help="then the table again, a busy loop on every CPU"
    )
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument(
        "--against", metavar="REV", help="compare with the module at a git revision instead"
    )
    args = parser.parse_args()
    if args.against:
        return against(args.against)
    if args.stress:
        return stress(args.count, args.threads)
    quiet = bench(args.n)
    table(quiet, "quiet")
    if args.load:
        with busy(os.cpu_count() or 1):
            loaded = bench(args.n)
        table(loaded, f"a busy loop on each of {os.cpu_count()} CPUs")
        load_effect(quiet, loaded)
    return 0


if __name__ == "__main__":
    sys.exit(main())
