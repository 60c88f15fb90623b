"""The smoke test on this host's real KVM, with both backends."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest
from conftest import ROOT, diagnose, needs_kvm, spin

import boxlite_syscheck as b


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


def signal_state():
    handlers = {
        s: signal.getsignal(s)
        for s in signal.valid_signals()
        if s not in (signal.SIGKILL, signal.SIGSTOP)
    }
    return handlers, signal.pthread_sigmask(signal.SIG_BLOCK, [])


@needs_kvm
def test_guest_runs_and_halts(kvm_fd, backend):
    result = b.smoke_test(kvm_fd, backend=backend)
    assert result.backend == backend
    assert result.step == b.STEP_DONE and result.error == 0
    assert result.api_version == b.KVM_API_VERSION
    assert result.exit_reason == b.KVM_EXIT_HLT
    assert result.proof == b.PROOF_VALUE
    assert result.ok and not result.timed_out
    assert 0 < result.elapsed < result.timeout


@needs_kvm
def test_both_backends_agree(kvm_fd):
    native = b.smoke_test(kvm_fd, backend="native")
    python = b.smoke_test(kvm_fd, backend="python")
    assert b._outcome(native) == b._outcome(python)


@needs_kvm
def test_guest_without_the_proof_value_fails(kvm_fd, backend):
    result = b._run_program(kvm_fd, b._real_mode_guest(b"\xf4"), 2.0, backend)  # hlt alone
    assert result.exit_reason == b.KVM_EXIT_HLT and result.proof != b.PROOF_VALUE
    assert not result.ok
    assert diagnose(result).cause == "smoke-no-proof"


@needs_kvm
def test_system_check_passes_and_close_releases(backend, mocker):
    before = open_fds()
    host = b.SystemCheck.run(backend=backend, engine=None)
    fd = host.fileno()
    assert os.readlink(f"/proc/self/fd/{fd}") == "/dev/kvm"
    assert os.get_inheritable(fd) is False
    assert host.smoke_tested and host.smoke.backend == backend
    host.close()
    host.close()
    assert open_fds() == before


@needs_kvm
@pytest.mark.parametrize("where", ["main thread", "worker thread"])
def test_spinning_guest_times_out_and_restores_state(kvm_fd, backend, where):
    handlers, mask = signal_state()
    threads, fds = threading.active_count(), open_fds()
    out = {}

    def spinning():
        started = time.monotonic()
        out["result"] = spin(kvm_fd, backend, 0.3)
        out["took"] = time.monotonic() - started
        out["mask"] = signal.pthread_sigmask(signal.SIG_BLOCK, [])

    if where == "main thread":
        spinning()
        assert out["mask"] == mask
    else:
        worker = threading.Thread(target=spinning)
        worker.start()
        worker.join(5)
        assert not worker.is_alive()
    result = out["result"]
    assert result.timed_out and result.step == b.STEP_RUN and result.exit_reason == -1
    assert 0.3 <= out["took"] <= 0.4
    assert diagnose(result).cause == "smoke-timeout"
    assert signal_state() == (handlers, mask)
    assert threading.active_count() == threads
    assert open_fds() == fds


@needs_kvm
def test_passes_under_a_100us_interval_timer(kvm_fd, backend):
    ticks = []
    previous = signal.signal(signal.SIGALRM, lambda *_: ticks.append(1))
    signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
    try:
        results = [b.smoke_test(kvm_fd, backend=backend) for _ in range(20)]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
    assert ticks, "the interval timer never fired"
    assert all(r.ok for r in results), [r for r in results if not r.ok]


@needs_kvm
def test_a_thousand_checks_leak_no_descriptor(backend):
    for _ in range(5):
        b.SystemCheck.run(backend=backend, engine=None).close()
    before = open_fds()
    for _ in range(1000):
        with b.SystemCheck.run(backend=backend, engine=None):
            pass
    assert open_fds() == before


@needs_kvm
def test_threads_gating_at_once_keep_the_descriptors_bounded():
    """Eight threads making default gates back to back: the releasing
    thread gets the interpreter's lock only in its turn and falls behind.
    The VMs it has not torn down must not pile up (hundreds of descriptors
    were seen; under a soft limit of 1024 our own next check would say
    fd-limit), so past a backlog each gate releases its VMs itself."""
    b._wait_for_closes()
    before = len(open_fds())
    peak, failures, stop = [before], [], threading.Event()

    def gates() -> None:
        for _ in range(40):
            try:
                b.SystemCheck.run().close()
            except b.UnsupportedError:
                pass  # this host's refusal is a gate's work too
            except b.BoxliteError as err:
                failures.append(err)

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], len(open_fds()))

    workers = [threading.Thread(target=gates) for _ in range(8)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    watcher.join()
    b._wait_for_closes()
    assert not failures, failures[:3]
    # Each thread: the device, its start-up VMs, the guest's VM and vCPU;
    # the queue: a backlog of jobs (threads may pass the check at once),
    # each with up to three descriptors; the watcher's own listing.
    most = before + 8 * 6 + (b._TEARDOWN_BACKLOG + 8) * 3 + 1
    assert peak[0] <= most, f"{peak[0]} descriptors open at once (bound {most})"
    assert len(open_fds()) == before


@needs_kvm
def test_timeout_must_be_positive(kvm_fd):
    with pytest.raises(b.InvalidArgumentError):
        b.smoke_test(kvm_fd, timeout=0)


# ── Loading the native library ──────────────────────────────────────────────


def build(tmp_path, name, *flags, source=ROOT / "kvm_smoke.c"):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    out = tmp_path / name
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), *flags, str(source)], check=True)
    return out


def test_default_path_is_next_to_the_module(monkeypatch):
    monkeypatch.delenv(b.LIBRARY_ENV, raising=False)
    assert b._native_path() == str(ROOT / "libkvmsmoke.so")


@needs_kvm
def test_environment_variable_names_the_library(kvm_fd, tmp_path, monkeypatch):
    lib = build(tmp_path, "other.so")
    monkeypatch.setenv(b.LIBRARY_ENV, str(lib))
    assert b.native_backend() == (True, str(lib))
    assert b.smoke_test(kvm_fd).backend == "native"


@needs_kvm
def test_relative_path_is_refused(kvm_fd, monkeypatch, caplog, mocker):
    load = mocker.spy(b, "_load_library")
    monkeypatch.setenv(b.LIBRARY_ENV, "libkvmsmoke.so")
    with caplog.at_level(logging.WARNING, logger="boxlite_syscheck"):
        result = b.smoke_test(kvm_fd)
    assert result.backend == "python" and result.ok
    assert load.call_count == 0
    assert "not an absolute path" in caplog.text


@needs_kvm
def test_a_file_that_is_not_a_library_falls_back(kvm_fd, tmp_path, monkeypatch, caplog):
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an ELF file")
    monkeypatch.setenv(b.LIBRARY_ENV, str(junk))
    with caplog.at_level(logging.WARNING, logger="boxlite_syscheck"):
        result = b.smoke_test(kvm_fd)
    assert result.backend == "python" and result.ok
    assert str(junk) in caplog.text


@needs_kvm
def test_library_without_the_symbols_falls_back(kvm_fd, tmp_path, monkeypatch, caplog):
    source = tmp_path / "empty.c"
    source.write_text("int unrelated(void) { return 0; }\n")
    lib = build(tmp_path, "empty.so", source=source)
    monkeypatch.setenv(b.LIBRARY_ENV, str(lib))
    with caplog.at_level(logging.WARNING, logger="boxlite_syscheck"):
        assert b.smoke_test(kvm_fd).backend == "python"
    assert "kvmsmoke_abi_version" in caplog.text


@needs_kvm
def test_library_of_another_abi_version_falls_back(kvm_fd, tmp_path, monkeypatch, caplog):
    lib = build(tmp_path, "v99.so", "-DKVMSMOKE_ABI_VERSION=99")
    monkeypatch.setenv(b.LIBRARY_ENV, str(lib))
    with caplog.at_level(logging.WARNING, logger="boxlite_syscheck"):
        assert b.smoke_test(kvm_fd).backend == "python"
    assert "ABI version 99" in caplog.text


def test_missing_library_is_an_internal_error_when_native_is_required(tmp_path, monkeypatch):
    monkeypatch.setenv(b.LIBRARY_ENV, str(tmp_path / "absent.so"))
    with pytest.raises(b.InternalError) as caught:
        b.smoke_test(0, backend="native")
    assert "make" in caught.value.fix
    assert str(caught.value).startswith("internal error: ")


# ── The kept buffers and operation arrays (_Kit) ─────────────────────────────


def kept_kit(kind: str) -> b._Kit:
    (kit,) = b._CACHE["kits"][id(b._guest(kind))]
    return kit


def speed_runs(monkeypatch) -> list[int]:
    """The KVM_RUNs each speed sample made, by the session's own count:
    how many samples a probe takes depends on the host's noise, so the
    rest of a session is what two sessions can be compared on."""
    made: list[int] = []
    slope = b._guest_slope

    def counted(session, attempt, host_ns):
        before = session.out.runs
        sampled = slope(session, attempt, host_ns)
        final = sampled is not None and sampled[1] is not None  # the final run is the rest's
        made.append(session.out.runs - before - final)
        return sampled

    monkeypatch.setattr(b, "_guest_slope", counted)
    return made


@needs_kvm
def test_a_kept_kit_is_reset_before_its_next_session(kvm_fd, backend, monkeypatch):
    made = speed_runs(monkeypatch)
    first = b.smoke_test(kvm_fd, backend=backend, guest="long-mode")
    first_rest, made[:] = first.runs - sum(made), []
    assert first.step == b.STEP_DONE, first
    kit = kept_kit("long-mode")
    assert kit.arrays, "the first session's arrays are kept"
    # Everything KVM or a run writes, left as a broken session might leave it.
    ctypes = pytest.importorskip("ctypes")
    ctypes.memset(ctypes.addressof(kit.out), 0x7F, ctypes.sizeof(kit.out))
    kit.state.fds[1] = kit.state.fds[2] = kvm_fd  # not ours to close
    kit.state.deadline_ns = 1  # long past: a run would stop at once
    kit.cpuid.nent = 1  # too small: KVM_GET_SUPPORTED_CPUID would say E2BIG
    kit.msr_list.nmsrs = kit.feature_list.nmsrs = 0
    kit.arch_msrs.entries[0].data = 0xDEAD
    ctypes.memset(kit.mem_addr, 0xCC, len(kit.mem))  # the guest memory: int3 everywhere
    second = b.smoke_test(kvm_fd, backend=backend, guest="long-mode")
    assert kept_kit("long-mode") is kit, "the same kit came back"
    assert b._outcome(second) == b._outcome(first)
    assert second.runs - sum(made) == first_rest and not second.timed_out
    assert second.speed is not None and first.speed is not None
    assert second.speed.guest_ns < 10 * first.speed.guest_ns + 1000  # no time added up
    assert second.cx16_value == first.cx16_value
    os.fstat(kvm_fd)  # still open
    # The trivial guest's kept memory too, and a mapping not kept is unmapped.
    assert b.smoke_test(kvm_fd, backend=backend).ok
    trivial = kept_kit("real-mode")
    ctypes.memset(trivial.mem_addr, 0xCC, len(trivial.mem))
    assert b.smoke_test(kvm_fd, backend=backend).ok
    assert kept_kit("real-mode") is trivial
    image = b._guest("real-mode").image  # the rest as a fresh mapping leaves it: zeros
    assert trivial.mem[: len(image)] == image and not any(trivial.mem[len(image) :])
    spare = b._Kit(b._guest("real-mode"))
    for _ in range(b._KITS_KEPT):
        b._give_back(b._guest("real-mode"), b._Kit(b._guest("real-mode")))
    b._give_back(b._guest("real-mode"), spare)
    assert spare.mem.closed and not trivial.mem.closed


@needs_kvm
def test_every_run_has_a_cookie_of_its_own_across_kept_arrays(kvm_fd, backend, monkeypatch):
    cookies: list[int] = []
    array = b._Kit.array

    def recorded(kit, plan, key=None):
        built = array(kit, plan, key)
        cookies.extend(int(built[0][i].src) for i in built[2])
        return built

    monkeypatch.setattr(b._Kit, "array", recorded)
    for _ in range(2):
        assert b.smoke_test(kvm_fd, backend=backend, guest="long-mode").step == b.STEP_DONE
    assert len(cookies) >= 10 and len(set(cookies)) == len(cookies)


@needs_kvm
def test_a_kept_one_array_plan_is_the_plan_its_session_would_build(kvm_fd, backend):
    # The trivial guest's array is kept under (guest, bound, signal), not
    # under its operations: it must hold what building it afresh gives, and
    # a new bound must give a new array, never the old one.
    import struct

    def ops(array, count):
        raw = ctypes.string_at(ctypes.addressof(array), ctypes.sizeof(b._abi().Op) * count)
        fields = [list(op) for op in struct.iter_unpack("=8iq4Q", raw)]
        for op in fields:
            if op[1] == b._OP_RUN:
                op[11] = 0  # the cookie, stamped afresh for each run
        return fields

    ctypes = pytest.importorskip("ctypes")
    for timeout in (1.0, 2.5, 1.0):
        result = b.smoke_test(kvm_fd, timeout=timeout, backend=backend)
        assert result.ok, result
        kit = kept_kit("real-mode")
        session = b._Session.__new__(b._Session)
        session.kit, session.guest = kit, b._guest("real-mode")
        session.timeout_ns = int(timeout * 1e9)
        session.signo = b._timer_signal()
        session.region, session.sregs, session.regs = kit.region, kit.sregs, kit.regs
        session.wanted, session.spans = session.guest.wanted()
        session.result = result
        key = session.key("whole")
        kept, count, *_ = kit.arrays[key]
        fresh = b._trivial_plan(session)
        assert ops(kept, count) == ops(*fresh.build())
        runs = [op for op in ops(kept, count) if op[1] == b._OP_RUN]
        assert [op[9] for op in runs] == [int(timeout * 1e9)]
    assert len([k for k in kit.arrays if isinstance(k[0], str)]) == 2


@needs_kvm
def test_sessions_at_once_never_share_a_kit(kvm_fd, backend):
    results: list[b.SmokeResult] = []
    kits: set[int] = set()
    take = b._take_kit

    def worker() -> None:
        for _ in range(3):
            results.append(b.smoke_test(kvm_fd, backend=backend, guest="long-mode"))

    b._take_kit = lambda guest: kits.add(id(k := take(guest))) or k  # type: ignore[func-returns-value]
    try:
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        b._take_kit = take
    assert len(results) == 12
    assert len({b._outcome(r) for r in results}) == 1, "every session saw the same host"
    assert 1 < len(kits) <= 4 + 1  # one per thread at once, at most a spare beyond those kept
    assert len(b._CACHE["kits"][id(b._guest("long-mode"))]) <= b._KITS_KEPT


def test_the_cpuid_features_come_from_each_leafs_first_index_0_entry():
    abi = b._abi()
    cpuid = abi.KvmCpuid2()
    entries = [
        (9, 0, 1, 0, 0, 0),  # eax 1 then ebx 0: leaf 1 at index 0's bytes, inside an entry
        (7, 1, 0, 0, 0, 1 << 29),  # leaf 7 at index 1: not where ARCH_CAPABILITIES is
        (1, 0, 0, 1 << 13, 0, 0),  # leaf 1: CX16, no XSAVE
        (7, 0, 0, 0, 0, 0),
        (1, 0, 0, 1 << 26, 0, 0),  # a second leaf 1 entry: the first one counts
    ]
    for entry, (function, index, eax, ecx, ebx, edx) in zip(cpuid.entries, entries):
        entry.function, entry.index = function, index
        entry.eax, entry.ebx, entry.ecx, entry.edx = eax, ebx, ecx, edx
    cpuid.nent = len(entries)
    session = type("Session", (), {})()
    session.cpuid, session.result = cpuid, b.SmokeResult("native", guest="long-mode")
    b._read_cpuid(session)
    assert session.result.cpuid == {"cx16": True, "xsave": False, "arch_capabilities": False}
    cpuid.nent = 1  # only the entry that holds leaf 1's bytes inside it
    b._read_cpuid(session)
    assert session.result.cpuid == {"cx16": False, "xsave": False, "arch_capabilities": False}
    cpuid.entries[3].edx = 1 << 29
    cpuid.nent = 10**6  # more than the buffer holds: only the buffer is read
    b._read_cpuid(session)
    assert session.result.cpuid == {"cx16": True, "xsave": False, "arch_capabilities": True}
    # Each result is its own dict.
    session.result.cpuid["cx16"] = False
    b._read_cpuid(session)
    assert session.result.cpuid == {"cx16": True, "xsave": False, "arch_capabilities": True}


@needs_kvm
def test_capabilities_are_asked_in_arrays_as_one_ioctl_each_would(kvm_fd, backend):
    import fcntl

    names = b._all_caps("x86_64")  # more than one array holds
    assert len(names) > b._VALUE_SLOTS
    one_each = {n: fcntl.ioctl(kvm_fd, b.KVM_CHECK_EXTENSION, b.KVM_CAPS[n]) for n in names}
    assert b._kvm_answers(kvm_fd, names, backend) == one_each
    assert b._kvm_answers(kvm_fd, names[:3], backend) == {n: one_each[n] for n in names[:3]}
    assert b._kvm_answers(kvm_fd, (), backend) == {}


def test_a_device_that_is_not_kvm_is_asked_nothing_beyond_the_version(backend):
    with open("/dev/null", "rb") as null:  # its ioctls answer ENOTTY
        assert b._kvm_answers(null.fileno(), ("IRQCHIP", "USER_MEMORY"), backend) is None


@needs_kvm
def test_wide_arguments_reach_the_kernel_whole(kvm_fd):
    import ctypes

    # ioctl has no argtypes: a value past a C int goes as a c_ulong.
    assert b._wide(7) == 7 and b._wide(b._C_INT_MAX) == b._C_INT_MAX
    big = b._wide(1 << 40)
    assert big.value == 1 << 40 and b._wide(1 << 40) is big
    sregs = b._abi().KvmSregs()
    assert ctypes.addressof(sregs) > b._C_INT_MAX  # a heap address: it must not be cut
    vm = b._ioctl(kvm_fd, b.KVM_CREATE_VM, 0)
    try:
        vcpu = b._ioctl(vm, b.KVM_CREATE_VCPU, 0)
        try:
            assert b.KVM_GET_SREGS > b._C_INT_MAX
            assert b._ioctl(vcpu, b.KVM_GET_SREGS, ctypes.addressof(sregs)) == 0
        finally:
            os.close(vcpu)
    finally:
        os.close(vm)
    assert sregs.cs.selector == 0xF000  # the reset state, read into our buffer
