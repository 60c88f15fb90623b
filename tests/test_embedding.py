"""The check inside other people's programs: signals, limits, threads, policies.

Each case is real, with both backends, and the process state afterwards
(signal mask, handlers, pending signals, POSIX timers, descriptors) must be
what it was before.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

import pytest
from conftest import ROOT, SECCOMP_INSTALL, needs_kvm, needs_root, process_state, run_script, spin

import boxlite_syscheck as b

SI_TKILL = -6


# ── Signals the caller owns ─────────────────────────────────────────────────


def sent_and_taken(signo):
    """Send ``signo`` to this thread, take it back: what the caller would see."""
    signal.pthread_kill(threading.get_ident(), signo)
    info = signal.sigtimedwait({signo}, 0)
    assert info is not None
    return info.si_signo, info.si_code, info.si_pid, info.si_uid


@needs_kvm
def test_every_rt_signal_blocked_and_pending_is_left_as_it_was(kvm_fd, backend):
    """A caller that keeps a real-time signal blocked with one pending, for
    every real-time signal: the check passes and the signal is still there,
    once, as it was sent."""
    for signo in range(signal.SIGRTMIN, signal.SIGRTMAX + 1):
        saved = signal.pthread_sigmask(signal.SIG_BLOCK, {signo})
        try:
            reference = sent_and_taken(signo)
            before = process_state()
            signal.pthread_kill(threading.get_ident(), signo)
            assert signo in signal.sigpending()
            result = b.smoke_test(kvm_fd, backend=backend)
            assert result.ok and not result.timed_out, (signo, result)
            info = signal.sigtimedwait({signo}, 0)
            assert info is not None, f"{signo} was lost"
            assert (info.si_signo, info.si_code, info.si_pid, info.si_uid) == reference
            assert signal.sigtimedwait({signo}, 0) is None, f"{signo} was queued twice"
            assert result.requeued == (1 if signo == b._timer_signal() else 0)
            assert process_state() == before
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, saved)


@needs_kvm
def test_spinning_guest_times_out_with_our_own_signal_pending_foreign(kvm_fd, backend):
    signo = b._timer_signal()
    saved = signal.pthread_sigmask(signal.SIG_BLOCK, {signo})
    try:
        reference = sent_and_taken(signo)
        signal.pthread_kill(threading.get_ident(), signo)
        started = time.monotonic()
        result = spin(kvm_fd, backend, 0.3)
        took = time.monotonic() - started
        assert result.timed_out and 0.3 <= took < 0.6, (result, took)
        info = signal.sigtimedwait({signo}, 0)  # still theirs, as it was
        assert (info.si_signo, info.si_code, info.si_pid, info.si_uid) == reference
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, saved)


@needs_kvm
def test_the_watchdog_signal_of_someone_else_is_left_pending(kvm_fd, backend):
    """At RLIMIT_SIGPENDING 0 the watchdog uses SIGSTKFLT; a caller's pending
    SIGSTKFLT must survive the check (tested in a child with that limit)."""
    done = run_script(WATCHDOG_FOREIGN_SCRIPT, backend)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True"], done.stdout


WATCHDOG_FOREIGN_SCRIPT = r"""
import os, resource, signal, sys, threading
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
resource.setrlimit(resource.RLIMIT_SIGPENDING, (0, 0))
fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGSTKFLT})
signal.pthread_kill(threading.get_ident(), signal.SIGSTKFLT)
spin = b._run_program(fd, b._real_mode_guest(b"\xeb\xfe"), 0.3, sys.argv[2])
print(spin.timed_out, spin.bound == "watchdog thread",
      signal.sigtimedwait({signal.SIGSTKFLT}, 0) is not None)
"""


@needs_kvm
def test_a_handler_that_raises_propagates_unchanged(kvm_fd, backend):
    class Mine(TimeoutError):
        pass

    def handler(signo, frame):
        raise Mine("the caller's own timeout")

    before = process_state()
    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        started = time.monotonic()
        with pytest.raises(Mine, match="the caller's own timeout"):
            spin(kvm_fd, backend, 2.0)
        assert time.monotonic() - started < 0.5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert process_state() == before


SIGINT_SCRIPT = r"""
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
b.smoke_test(fd, backend=sys.argv[2])  # warm
mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
print("ready", flush=True)
started = time.monotonic()
try:
    b._run_program(fd, b._real_mode_guest(b"\xeb\xfe"), 10.0, sys.argv[2])
    print("no interrupt")
except KeyboardInterrupt:
    took = time.monotonic() - started
    same = signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask and not signal.sigpending()
    print(f"interrupted {took:.3f} {same} {len(os.listdir('/proc/self/fd'))}")
"""


@needs_kvm
def test_ctrl_c_during_a_spinning_guest_reaches_the_caller_at_once(backend):
    child = subprocess.Popen(
        [sys.executable, "-c", SIGINT_SCRIPT, str(ROOT), backend], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=15)
    words = out.split()
    assert words[0] == "interrupted", out
    assert 0.3 <= float(words[1]) < 1.0, out  # not the 10 s bound
    assert words[2] == "True", out  # mask restored, nothing left pending


# ── Limits ──────────────────────────────────────────────────────────────────

SIGPENDING_SCRIPT = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
resource.setrlimit(resource.RLIMIT_SIGPENDING, (0, 0))
fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
out = {}
for backend in ("native", "python"):
    ok = b.smoke_test(fd, backend=backend)
    started = time.monotonic()
    spin = b._run_program(fd, b._real_mode_guest(b"\xeb\xfe"), 0.3, backend)
    out[backend] = {"ok": ok.ok, "bound": ok.bound, "spin_timed_out": spin.timed_out,
                    "spin_bound": spin.bound, "took": time.monotonic() - started,
                    "timers": open("/proc/self/timers").read()}
print(json.dumps(out))
"""


@needs_kvm
def test_rlimit_sigpending_zero_falls_back_to_a_watchdog(run_json):
    out = run_json(SIGPENDING_SCRIPT)
    for backend in ("native", "python"):
        got = out[backend]
        assert got["ok"] and got["bound"] == "watchdog thread", got
        assert got["spin_timed_out"] and got["spin_bound"] == "watchdog thread", got
        assert 0.3 <= got["took"] < 0.8, got
        assert got["timers"] == ""


DESCRIPTOR_SCRIPT = r"""
import json, os, resource, sys
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
for backend in ("native", "python"):
    b.SystemCheck.run(backend=backend, engine=None).close()  # load everything first
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
out = {}
for free in range(1, 7):
    probe = os.open("/dev/null", os.O_RDONLY)
    os.close(probe)  # the lowest free descriptor
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe + free, hard))
    row = {}
    for backend in ("native", "python"):
        try:
            with b.SystemCheck.run(backend=backend, engine=None) as host:
                row[backend] = ["ok", list(map(str, b._outcome(host.smoke)))]
        except b.BoxliteError as err:
            row[backend] = [err.cause, str(err).splitlines()[0]]
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    out[free] = row
print(json.dumps(out))
"""


@needs_kvm
def test_both_backends_agree_at_every_descriptor_limit(run_json):
    out = run_json(DESCRIPTOR_SCRIPT)
    for free, row in out.items():
        assert row["native"] == row["python"], (free, row)
    assert out["1"]["native"][0] == "fd-limit"  # /dev/kvm fits, the VM does not
    assert out["6"]["native"][0] == "ok"


GATE_DESCRIPTOR_SCRIPT = r"""
import json, os, resource, sys
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b


def cause(backend):
    try:
        b.SystemCheck.run(backend=backend).close()
        return "ok"
    except b.BoxliteError as err:
        return err.cause
    finally:
        b._wait_for_closes()  # each limit starts with nothing of ours left


unlimited = {backend: cause(backend) for backend in ("native", "python")}
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
out = {}
for free in range(1, 7):
    probe = os.open("/dev/null", os.O_RDONLY)
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe + free, hard))
    try:
        out[free] = {backend: cause(backend) for backend in ("native", "python")}
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print(json.dumps({"unlimited": unlimited, "limited": out}))
"""


@needs_kvm
def test_the_default_gate_needs_four_descriptors_and_says_so_below(run_json):
    """The gate holds /dev/kvm, its start-up VM and the guest's VM and vCPU
    at once (the start-up VM is made just before the guest's, see gate()):
    with fewer free descriptors it says fd-limit, with four it gives the
    verdict it gives with no limit, on both backends."""
    out = run_json(GATE_DESCRIPTOR_SCRIPT)
    for free, row in out["limited"].items():
        want = "fd-limit" if int(free) < 4 else out["unlimited"]["native"]
        assert row == {"native": want, "python": want}, (free, out)


# ── Threads ─────────────────────────────────────────────────────────────────

THREADS_SCRIPT = r"""
import sys, threading
sys.path.insert(0, sys.argv[1])
sys.setswitchinterval(1e-6)
import boxlite_syscheck as b
errors = []
def first_use():
    try:
        for backend in ("native", "python"):
            b.SystemCheck.run(backend=backend, engine=None).close()
    except BaseException as err:
        errors.append(f"{type(err).__name__}: {err}")
threads = [threading.Thread(target=first_use) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print("errors:", errors)
"""


@needs_kvm
def test_first_use_from_many_threads_in_many_fresh_processes():
    for _ in range(20):
        done = run_script(THREADS_SCRIPT)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "errors: []", done.stdout


# ── Policies that answer EINTR ──────────────────────────────────────────────

EINTR_SCRIPT = (
    SECCOMP_INSTALL
    + r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
for backend in ("native", "python"):
    b.smoke_test(fd, backend=backend)  # load before the filter
_install_seccomp(int(sys.argv[2]), 4)  # EINTR, forever
out = {}
for backend in ("native", "python"):
    started = time.monotonic()
    r = b.smoke_test(fd, backend=backend, timeout=0.3)
    out[backend] = {"step": r.step_name, "errno": r.as_dict()["errno"],
                    "timed_out": r.timed_out, "took": time.monotonic() - started}
print(json.dumps(out))
"""
)


# One that makes a descriptor, one plain ioctl (the Python backend makes
# these two on different paths), and the run, bounded by its deadline.
EINTR_STEPS = {
    "KVM_CREATE_VM": b.STEP_CREATE_VM,
    "KVM_SET_USER_MEMORY_REGION": b.STEP_MEMORY_REGION,
}


@needs_root
@pytest.mark.parametrize("request_name", [*EINTR_STEPS, "KVM_RUN"])
def test_an_ioctl_that_always_answers_eintr_cannot_hang_the_check(request_name, run_json):
    out = run_json(EINTR_SCRIPT, str(getattr(b, request_name)))
    for backend in ("native", "python"):
        got = out[backend]
        assert got["took"] < 1.0, got
        if request_name in EINTR_STEPS:
            step = EINTR_STEPS[request_name]
            assert got["step"] == b.STEP_NAMES[step] and got["errno"] == "EINTR", got
        else:
            assert got["timed_out"], got  # bounded by the deadline
    assert out["native"]["step"] == out["python"]["step"]


# ── The interpreter's ABI, not the kernel's ─────────────────────────────────


@pytest.mark.parametrize(
    "multiarch, wide, abi",
    [
        ("x86_64-linux-gnu", True, "x86_64"),
        ("i386-linux-gnu", False, "i386"),
        ("aarch64-linux-gnu", True, "aarch64"),
        ("arm-linux-gnueabihf", False, "arm"),
    ],
)
def test_syscall_numbers_follow_the_interpreter(mocker, multiarch, wide, abi):
    mocker.patch.object(sys.implementation, "_multiarch", multiarch, create=True)
    mocker.patch.object(sys, "maxsize", 2**63 - 1 if wide else 2**31 - 1)
    assert b._interpreter_abi() == abi
    assert b._syscall_numbers() == b._SYSCALLS[abi]


def test_no_smoke_test_from_a_32_bit_interpreter(mocker):
    mocker.patch.object(sys, "maxsize", 2**31 - 1)
    assert not b.KvmProbe("x86_64").can_smoke_test


# ── Bad input and the command line's exit codes ─────────────────────────────


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), 1e300, True, "2"])
def test_bad_timeouts_are_refused_not_judged(timeout):
    with pytest.raises(b.InvalidArgumentError):
        b.check(timeout=timeout)
    with pytest.raises(b.InvalidArgumentError):
        b.SystemCheck.run(timeout=timeout)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e300", "3600.5"])
def test_cli_bad_timeout_is_a_usage_error(value, capsys):
    assert b.main(["--timeout", value]) == 2
    assert "--timeout" in capsys.readouterr().err


@needs_kvm
def test_cli_native_backend_missing_is_the_checkers_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(b.LIBRARY_ENV, str(tmp_path / "absent.so"))
    assert b.main(["--backend", "native"]) == 3
    err = capsys.readouterr().err
    assert "the checker failed" in err and "make" in err


@needs_kvm
def test_header_and_json_name_the_backend_that_ran(capsys):
    b.main(["--backend", "python", "--engine", "none"])
    assert "smoke test: python backend" in capsys.readouterr().out
    b.main(["--backend", "python", "--engine", "none", "--json"])
    assert json.loads(capsys.readouterr().out)["host"]["smoke_backend"] == "python"


@needs_kvm
def test_cli_full_disk_says_one_line_and_exits_3():
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "boxlite_syscheck", "--engine", "none"],
            cwd=ROOT,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert done.returncode == 3
    assert done.stderr.strip().splitlines() == [
        "boxlite_syscheck: cannot write the report: ENOSPC (No space left on device)"
    ]


@needs_kvm
def test_cli_closed_pipe_exits_quietly():
    read, write = os.pipe()
    os.close(read)  # nobody will read
    done = subprocess.run(
        [sys.executable, "-m", "boxlite_syscheck", "--engine", "none"],
        cwd=ROOT,
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write)
    assert done.returncode == b.EXIT_BROKEN_PIPE
    assert done.stderr == ""


@needs_kvm
def test_with_no_timer_and_no_thread_the_run_is_unbounded_and_said(kvm_fd, mocker):
    mocker.patch.object(b, "_timer_start", side_effect=b._SysError(11, "EAGAIN"))
    mocker.patch.object(b, "_Watchdog", side_effect=RuntimeError("can't start new thread"))
    result = b.smoke_test(kvm_fd, backend="python")
    assert result.ok and result.bound == "none"  # the guest's result still counts
    facts = b.Facts(engine=None, evidence=b.Evidence(gather=False))
    facts.smoke = result
    finding = b._smoke_finding(facts, None, result.elapsed)
    assert finding.status == "warn" and "unbounded" in finding.summary


def test_the_watchdog_signal_is_sigstkflt():
    assert b._watchdog_signal() == signal.SIGSTKFLT  # named in the signal module from 3.11


# ── A caller's exception is never the device's answer ───────────────────────


class Caller(TimeoutError):
    """What a caller's signal handler raises: an OSError without an errno."""


@pytest.mark.parametrize("seam", ["_open_device", "_stat", "_read_text", "_exists"])
def test_a_callers_exception_in_any_read_is_the_callers(mocker, seam):
    """The node is missing, so the diagnosis reads the node, /proc and /sys:
    the caller's exception, raised in any of those calls, comes back as it was."""
    mine = Caller("the caller's deadline")
    probe = b.KvmProbe("x86_64", path="/dev/kvm-absent")
    mocker.patch.object(b, seam, side_effect=mine)
    with pytest.raises(Caller) as caught:
        probe.acquire(engine=None)
    assert caught.value is mine


def test_a_callers_exception_while_reading_the_acl_is_the_callers(mocker):
    mine = Caller("the caller's deadline")
    mocker.patch.object(b, "_open_device", side_effect=PermissionError(13, "denied"))
    mocker.patch.object(b, "_getxattr", side_effect=mine)
    with pytest.raises(Caller) as caught:
        b.KvmProbe("x86_64").acquire(engine=None)
    assert caught.value is mine


@needs_kvm
@pytest.mark.parametrize(
    ("backend", "call"),
    # The native backend's ioctls run in C: the stress test below covers them.
    [("native", "mmap"), ("python", "mmap"), ("python", "ioctl")],
)
def test_a_callers_exception_in_mmap_or_an_ioctl_is_the_callers(kvm_fd, backend, mocker, call):
    mine = Caller("the caller's deadline")
    before = sorted(os.listdir("/proc/self/fd"))
    if call == "mmap":
        mocker.patch("mmap.mmap", side_effect=mine)
    else:
        mocker.patch.object(b, "_ioctl", side_effect=mine)
    with pytest.raises(Caller) as caught:
        b.smoke_test(kvm_fd, backend=backend)
    assert caught.value is mine
    assert sorted(os.listdir("/proc/self/fd")) == before


STRESS_SCRIPT = r"""
import collections, json, os, random, signal, sys
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b


class Mine(TimeoutError):
    pass


def handler(signo, frame):
    raise Mine("the caller's deadline")


backend, count = sys.argv[2], int(sys.argv[3])
engine = None if sys.argv[4] == "none" else sys.argv[4]
if sys.argv[5:] == ["here"]:  # no releasing thread takes a teardown: each is made here
    b._TEARDOWN_BACKLOG = 0
probes = {"device": b.KvmProbe("x86_64"), "missing": b.KvmProbe("x86_64", path="/dev/kvm-absent")}
try:  # warm; and what the device's gate says undisturbed
    b.SystemCheck.run(engine=engine, backend=backend).close()
    undisturbed = None
except b.BoxliteError as err:
    undisturbed = err.cause
b._wait_for_closes()
signal.signal(signal.SIGALRM, handler)
before = sorted(os.listdir("/proc/self/fd"))
seen, wrong = collections.Counter(), []
for i in range(count):
    name = "device" if i % 2 else "missing"
    try:
        try:  # a one-shot timer somewhere inside the check
            signal.setitimer(signal.ITIMER_REAL, random.uniform(1e-6, 2e-3 if i % 2 else 1e-3))
            device, smoke = probes[name].acquire(engine=engine, backend=backend)
            device.close()
            seen[name + " passed"] += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Mine:
        seen[name + " the caller's"] += 1
    except b.BoxliteError as err:
        seen[f"{name} {err.cause}"] += 1
        if name == "device" and err.cause == undisturbed:
            continue
        if name == "device" or not err.cause.startswith(("kvm-no-", "kvm-node", "kvm-module")):
            wrong.append(f"{name}: {type(err).__name__} {err.cause}: {err.summary}")
    except BaseException as err:
        wrong.append(f"{name}: {type(err).__name__}: {err}")
signal.signal(signal.SIGALRM, signal.SIG_DFL)
b._wait_for_closes()  # the run areas and the start-up VMs left to the releasing thread
after = sorted(os.listdir("/proc/self/fd"))
with open("/proc/self/maps") as maps:
    areas = sum("kvm-vcpu" in line for line in maps)
print(json.dumps({"seen": seen, "wrong": wrong, "fds": [len(before), len(after)], "areas": areas}))
"""


@needs_kvm
@pytest.mark.parametrize(
    ("engine", "count", "teardown"),
    [
        ("none", "3000", "thread"),
        (b.DEFAULT_ENGINE, "1200", "thread"),
        (b.DEFAULT_ENGINE, "1200", "here"),
    ],
)
def test_a_callers_exception_at_any_moment_is_the_callers_and_leaks_nothing(
    backend, run_json, engine, count, teardown
):
    """A timer of the caller's fires anywhere in the check (open, the
    evidence reads, the ioctls, the start-up VMs, mmap, the guest run, the
    release, and the teardowns, made in the caller's thread where no
    thread takes them): its exception reaches the caller unchanged, no
    verdict is made of it (the gate says what it says undisturbed, or
    nothing), and no descriptor or mapping is left behind."""
    out = run_json(STRESS_SCRIPT, backend, count, engine, teardown, timeout=240)
    assert out["wrong"] == [], out
    assert out["fds"][0] == out["fds"][1] and out["areas"] == 0, out
    caught = sum(n for what, n in out["seen"].items() if what.endswith("the caller's"))
    assert caught > int(count) // 3, out  # the timer really landed inside the check


@needs_kvm
@pytest.mark.parametrize(("mib", "code"), [(16, 3), (24, 0)])
def test_the_checkers_own_memory_error_exits_3(tmp_path, mib, code):
    """Under a small address-space limit the checker itself fails: exit 3,
    one line on stderr, never "not usable".  With its bytecode cached (as
    `make` leaves it), 24 MiB is enough to check the device."""
    for name in ("boxlite_syscheck.py", "libkvmsmoke.so"):
        shutil.copy(ROOT / name, tmp_path)
    subprocess.run(
        [sys.executable, "-m", "py_compile", str(tmp_path / "boxlite_syscheck.py")], check=True
    )
    command = [
        "prlimit",
        f"--as={mib << 20}",
        "/usr/bin/python3",
        "-m",
        "boxlite_syscheck",
        "--engine",
        "none",
        "-q",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stdout + done.stderr
    if code == 3:
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "the checker failed" in done.stderr and "says nothing about the host" in done.stderr


TEARDOWN_SCRIPT = r"""
import json, os, sys, threading
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b

backend, mode = sys.argv[2], sys.argv[3]


def areas() -> int:
    with open("/proc/self/maps") as maps:
        return sum("kvm-vcpu" in line for line in maps)


def kvm_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:kvm")
        except OSError:  # the listing's own descriptor, closed since
            pass
    return count


gate = threading.Event()
if mode == "cli":
    b._hold_for_exit()
elif mode == "bad-advice":
    b._MADV_DONTFORK = -1  # EINVAL from the kernel: the area cannot be kept from forks
releaser = b._cached("releaser", b._start_releaser)
stalls = b._TEARDOWN_BACKLOG if mode == "backlog" else 1
for _ in range(stalls):  # the thread is busy until the gate opens
    releaser.put(lambda: gate.wait(30) or None)
b.SystemCheck.run(engine=None, backend=backend).close()
out = {"areas": areas(), "kvm_fds": kvm_fds()}
child_reads, child_writes = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(child_writes, str(areas()).encode())
    os._exit(0)
os.close(child_writes)
out["child_areas"] = int(os.read(child_reads, 16))
os.waitpid(pid, 0)
gate.set()
b._wait_for_closes()
out["areas_after"] = areas()
print(json.dumps(out))
"""


@needs_kvm
@pytest.mark.parametrize(
    ("mode", "left"), [("program", 1), ("cli", 0), ("backlog", 0), ("bad-advice", 0)]
)
def test_the_guests_teardown_is_left_to_the_thread_only_where_it_can_be(
    backend, run_json, mode, left
):
    """In a program the check closes its VM's descriptors and leaves the
    run area, whose unmap tears the VM down, to the releasing thread (held
    up here): the check returns with it still mapped, a forked child never
    has it, and it is gone once the thread has run.  The command line, a
    backlog on the thread, and an area the kernel cannot keep from forks
    each tear the VM down before the check returns."""
    out = run_json(TEARDOWN_SCRIPT, backend, mode)
    assert out["kvm_fds"] == 0, out  # closed either way, at once
    assert out["areas"] == left, out
    assert out["child_areas"] == 0 and out["areas_after"] == 0, out


HOLD_SCRIPT = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b

backend = sys.argv[2]


def alive() -> int:  # the VMs this process still holds: descriptors and run areas
    vms = sum(os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:kvm-vm" for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))
    with open("/proc/self/maps") as maps:
        return vms + sum("kvm-vcpu" in line for line in maps)


seen = []
run = b.KvmProbe._run


def watched(*args, **kwargs):
    try:
        return run(*args, **kwargs)
    finally:
        time.sleep(0.05)  # time enough for a thread not held to release them
        seen.append(alive())


b.KvmProbe._run = watched
for check in (lambda: b.SystemCheck.run(backend=backend).close(), lambda: b.check(backend=backend)):
    try:
        check()
    except b.BoxliteError:
        pass
    b._wait_for_closes()
    seen.append(alive())
print(json.dumps(seen))
"""


@needs_kvm
def test_the_start_up_vms_outlive_the_guests_runs_and_no_more(backend, run_json):
    """The gate and the report make their start-up VMs before the guest's
    (a VM made soon after another skips a grace period on Linux 6.1), and
    the releasing thread is held until the guest is done: no teardown runs
    beside its runs (on a one-CPU host it would take the CPU from the speed
    probe).  Once let go, everything is released."""
    seen = run_json(HOLD_SCRIPT, backend)
    # After the guest: the gate's start-up VM and its guest's run area, the
    # report's two start-up VMs (the split irqchip has its own) and its area.
    assert seen == [2, 0, 3, 0], seen


EXIT_SCRIPT = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b

mark, held = sys.argv[2], sys.argv[3] == "held"
try:
    b.SystemCheck.run().close()
except b.BoxliteError:
    pass


def slow() -> None:  # a teardown still running when the program ends
    time.sleep(0.3)
    with open(mark, "w") as out:
        out.write("released")


if held:
    b._HeldReleases().__enter__()  # a hold nobody let go
b._release_later(slow)
"""


@pytest.mark.parametrize("held", ["held", "free"])
def test_a_program_that_exits_after_a_check_waits_for_its_releases(tmp_path, held):
    """A program may end right after the gate: its interpreter must not
    finalize with the releasing thread inside a teardown (in a guest image
    without libgcc_s that aborted the process), so exit waits for it, even
    for jobs a hold left waiting."""
    mark = tmp_path / "mark"
    done = run_script(EXIT_SCRIPT, str(mark), held)
    assert done.returncode == 0, done.stderr[-3000:]
    assert mark.read_text() == "released"


def within(seconds: float, done: Callable[[], bool]) -> bool:
    """Whether ``done()`` comes true within ``seconds`` (a job the releasing
    thread runs in its own time)."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def test_held_jobs_wait_for_let_go_and_a_join_starts_them():
    jobs = b._start_releaser()
    assert jobs is not None
    done: list[int] = []
    jobs.hold()
    jobs.put(lambda: done.append(1))
    time.sleep(0.1)
    assert done == [], "a held job ran"
    jobs.let_go()
    jobs.join()
    assert done == [1]
    jobs.hold()
    jobs.put(lambda: done.append(2))
    jobs.join()  # a hold never let go does not strand its jobs
    assert done == [1, 2]
    jobs.put(lambda: done.append(3))  # and the join ended it
    assert within(5, lambda: done[-1] == 3), done


def test_a_callers_signal_inside_the_python_release_leaks_nothing(mocker):
    """The Python backend clears each entry of the state before its call
    (a release is never made twice), so a caller's handler that raised
    between the two would leak the mapping or the descriptor: the release
    runs with every signal blocked, and the caller's signal comes after it."""
    import ctypes

    libc = b._sys_libc()
    state = b._abi().State()
    size = mmap.PAGESIZE
    addr = libc.mmap(None, size, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    assert addr not in (None, ctypes.c_void_p(-1).value)
    state.run_addr, state.run_size = addr, size
    fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(2)]
    state.fds[:] = [-1, *fds] + [-1] * (b._FD_SLOTS - 3)  # a zeroed slot would be stdin

    class SignalledLibc:  # the caller's signal arrives just before the unmap
        def __getattr__(self, name: str) -> object:
            if name != "munmap":
                return getattr(libc, name)

            def munmap(*args: object) -> int:
                os.kill(os.getpid(), signal.SIGUSR1)
                return int(libc.munmap(*args))

            return munmap

    def handler(signo: int, frame: object) -> None:
        raise Caller("the caller's deadline")

    mocker.patch.object(b, "_sys_libc", return_value=SignalledLibc())
    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with pytest.raises(Caller):
            b._PythonBackend().release(state)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    for fd in fds:  # before anything else is opened, which could take the number
        with pytest.raises(OSError):
            os.fstat(fd)
    start = f"{addr:x}-"
    with open("/proc/self/maps") as maps:
        assert not any(line.startswith(start) for line in maps), "the run area was left mapped"
    assert (state.run_addr, list(state.fds[1:3])) == (0, [-1, -1])


def test_a_hold_left_by_an_interrupted_check_ends_at_the_next_let_go():
    """A caller's exception can land between a check's hold and its let-go
    (inside the hold itself): the next check's let-go must start what
    waits, or its VMs would stay alive for good (a count of holds did
    that: the stress test above found run areas left mapped)."""
    jobs = b._start_releaser()
    assert jobs is not None
    done: list[int] = []
    jobs.hold()  # the interrupted check's, never let go
    jobs.hold()  # the next check's
    jobs.put(lambda: done.append(1))
    jobs.let_go()
    assert within(5, lambda: bool(done)), "the next let-go did not start the job"
    assert done == [1]


def test_the_releasing_thread_survives_a_failing_release_and_join_waits():
    jobs = b._start_releaser()
    assert jobs is not None
    done: list[int] = []
    gate = threading.Event()

    def failing() -> None:
        raise OSError(9, "Bad file descriptor")

    def slow() -> None:
        gate.wait(5)
        done.append(1)

    jobs.put(failing)
    jobs.put(slow)
    for n in range(2, 50):
        jobs.put(lambda n=n: done.append(n))
    waiter = threading.Thread(target=jobs.join)
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive(), "join() returned while a release was still running"
    gate.set()
    waiter.join(5)
    assert not waiter.is_alive() and done == list(range(1, 50))
    jobs.join()  # nothing left: returns at once
    jobs.put(lambda: done.append(50))
    jobs.join()
    assert done[-1] == 50


def test_a_refusal_is_freed_when_dropped_not_left_for_the_collector(mocker, tmp_path):
    # A caller that retries the gate in a loop must not pile up cycles of
    # refusals (each holding its facts, evidence and guest result) until
    # the next garbage collection.
    import gc
    import weakref

    mocker.patch.object(b, "_PROBE", b.KvmProbe("x86_64", str(tmp_path / "kvm")))
    gc.collect()
    gc.disable()
    try:
        with pytest.raises(b.BoxliteError) as caught:
            b.SystemCheck.run(engine=None)
        assert caught.value.cause.startswith("kvm-"), caught.value  # no node at that path
        dropped = weakref.ref(caught.value)
        del caught
        assert dropped() is None, "the refusal outlived its last reference"
    finally:
        gc.enable()


def test_the_callers_mask_is_put_back_only_once_it_was_saved():
    libc, usr1 = b._sys_libc(), {signal.SIGUSR1}
    old = signal.pthread_sigmask(signal.SIG_SETMASK, usr1)
    try:
        saved = b._unsaved_mask()
        b._restore_signals(libc, saved)  # nothing saved yet: the mask is left alone
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == usr1
        b._block_signals(libc, saved)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert blocked == signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
        b._restore_signals(libc, saved)
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == usr1
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
