"""The C floor `make bench` and the nested host measure against
(tests/gate_floor.c): it must do the work it stands for, or every ratio
against it says nothing."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import time
from pathlib import Path

import guest_cases
import pytest
from conftest import ROOT, needs_kvm
from vmhost import GATE_FLOOR_LIBRARY

import boxlite_syscheck as b

SOURCE = ROOT / "tests" / "gate_floor.c"
HOST_VERBS = ("open", "stat", "read", "xattr", "user", "group", "groupname")


def build(where: Path, *flags: str) -> Path:
    out = where / ("libgate_floor.so" if flags else "gate_floor")
    subprocess.run(
        ["cc", "-O2", "-Wall", "-Wextra", "-Werror", *flags, str(SOURCE), "-o", str(out)],
        check=True,
    )
    return out


def host_reads(spec: str) -> list[str]:
    return [line for line in spec.splitlines() if line.split()[0] in HOST_VERBS]


@needs_kvm
def test_the_floor_makes_the_gates_runs_and_ends_them_as_the_gate_did(tmp_path, kvm_fd, mocker):
    # The runs the recorded gate's backend really made (an OP_UNLESS ends an
    # array before its later runs: here the long ones after an emulated
    # sample): the spec holds those, not every run its arrays hold.
    made, passes = [], []
    execute, work = b._NativeBackend.execute, guest_cases._work

    def counted(backend, ops, count, state, out):
        before = out.runs
        execute(backend, ops, count, state, out)
        if len(passes) == 2:  # gate_spec's second pass is the one recorded
            made.append(out.runs - before)

    def passed(*args):
        passes.append(args)
        work(*args)

    mocker.patch.object(b._NativeBackend, "execute", counted)
    mocker.patch.object(guest_cases, "_work", passed)
    spec = guest_cases.gate_spec("gate")
    mocker.stopall()
    runs = [line for line in spec.splitlines() if line.startswith("run ")]
    assert len(passes) == 2 and len(runs) == sum(made)
    lib = guest_cases.load_floor(str(build(tmp_path, *GATE_FLOOR_LIBRARY)), spec)
    assert lib.gate_floor_once_ns() > 0
    exits = (ctypes.c_uint * 64)()
    count = lib.gate_floor_exits(exits, len(exits))
    # The gate's own guest, run here by the module: the floor's last run
    # must stop where it stopped (HLT on a good host, here the emulation
    # failure at the stock kernel's instruction).
    smoke = b.smoke_test(kvm_fd, guest="long-mode")
    assert count == len(runs) > 0
    assert exits[count - 1] == smoke.exit_reason


@needs_kvm
def test_a_reports_floor_reads_what_check_reads_each_once(mocker):
    b.check()  # warm, as the recording is
    read = mocker.patch.object(b, "_read_text", side_effect=b._read_text)
    exists = mocker.patch.object(b, "_exists", side_effect=b._exists)
    b.check()
    read_paths = {call.args[0] for call in read.call_args_list}
    stat_paths = {call.args[0] for call in exists.call_args_list}
    mocker.stopall()
    seams = {name: getattr(b, name) for name in guest_cases._OS_SEAMS}

    spec = guest_cases.gate_spec("check")

    assert {name: getattr(b, name) for name in guest_cases._OS_SEAMS} == seams  # restored
    reads = host_reads(spec)
    assert len(reads) == len(set(reads))
    assert {line.split()[1] for line in reads if line.startswith("read ")} == read_paths
    assert stat_paths <= {line.split()[1] for line in reads if line.startswith("stat ")}
    # The device is the floor's own first open, not a host read of its own.
    assert f"open {b.KVM_DEVICE}" not in reads
    # check() asks every engine's capabilities, more than the gate.
    caps = [line for line in spec.splitlines() if line.startswith("cap ")]
    gate_caps = [line for line in guest_cases.gate_spec().splitlines() if line.startswith("cap ")]
    assert len(caps) > len(gate_caps)


@needs_kvm
def test_the_floor_really_reads_what_its_spec_names(tmp_path):
    fifo = tmp_path / "evidence"
    os.mkfifo(fifo)
    # check()'s own reads, then one of each verb its spec can hold, the FIFO last.
    spec = guest_cases.gate_spec("check")
    spec += f"xattr {b.KVM_DEVICE} system.posix_acl_access\ngroupname kvm\nopen /dev/null\n"
    spec += f"read {fifo}\n"
    assert {line.split()[0] for line in host_reads(spec)} == set(HOST_VERBS)
    (tmp_path / "gate.spec").write_text(spec)
    floor = subprocess.Popen(
        [str(build(tmp_path)), str(tmp_path / "gate.spec"), "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    opened = False
    deadline = time.monotonic() + 30
    while floor.poll() is None and not opened and time.monotonic() < deadline:
        try:  # succeeds only once the floor has the FIFO open for reading
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            assert err.errno == errno.ENXIO
            time.sleep(0.001)
            continue
        os.write(writer, b"evidence\n")
        os.close(writer)
        opened = True
    out, err = floor.communicate(timeout=30)
    assert opened, err.decode()
    assert floor.returncode == 0, err.decode()
    assert int(out.split()[0]) > 0


def test_a_spec_the_floor_cannot_read_stops_it(tmp_path):
    (tmp_path / "bad.spec").write_text("mem 4096\nimage f4\nfetch /etc/hostname\n")
    done = subprocess.run(
        [str(build(tmp_path)), str(tmp_path / "bad.spec"), "1"], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "cannot read: fetch /etc/hostname" in done.stderr


def test_a_recorded_argument_the_spec_cannot_hold_is_refused(mocker):
    mocker.patch.object(guest_cases, "_work")
    seam = b._read_text

    def work(work: str, backend: str) -> None:
        b._read_text("/tmp/a path with spaces")

    guest_cases._work.side_effect = work
    with pytest.raises(ValueError, match="cannot hold"):
        guest_cases.gate_spec("gate")
    assert b._read_text is seam


@needs_kvm
def test_the_floors_clocks_time_only_its_last_pass(tmp_path):
    spec = guest_cases.gate_spec("gate")
    lib = guest_cases.load_floor(str(build(tmp_path, *GATE_FLOOR_LIBRARY)), spec)
    for _ in range(3):
        start = time.monotonic_ns()
        wall = lib.gate_floor_once_ns()
        whole = time.monotonic_ns() - start
        # One thread's CPU time inside its runs cannot exceed the pass's
        # wall time; a clock that kept the last passes' runs would.  The
        # VM's teardown comes after the pass's clock, inside the call: a
        # teardown on the pass's clock, or one kept from an earlier pass,
        # overflows what the call took.
        runs, release = lib.gate_floor_run_ns(), lib.gate_floor_release_ns()
        assert 0 < runs <= wall and release > 0
        assert wall + release <= whole


@needs_kvm
def test_the_gates_run_clock_counts_each_run_once(mocker):
    def gate() -> None:
        try:
            b.SystemCheck.run(backend="python").close()
        except b.BoxliteError:
            pass

    gate()  # warm: the arrays are built and kept
    real, took = b._python_run, []

    def each_run(*args: object) -> int:
        elapsed: int = real(*args)
        took.append(elapsed)
        return elapsed

    mocker.patch.object(b, "_python_run", side_effect=each_run)
    with guest_cases.RunTime() as clock:
        gate()
    # What each run added to its slot, against what the slots held when
    # their arrays had run: a slot read twice, or an array missed, differs.
    assert len(took) > 2
    assert clock.ns == sum(took) > 0


@needs_kvm
def test_the_floors_pause_comes_before_its_teardown_and_off_its_clock(tmp_path):
    spec = guest_cases.gate_spec("gate")
    lib = guest_cases.load_floor(str(build(tmp_path, *GATE_FLOOR_LIBRARY)), spec)
    pause_ns = 200_000_000  # far beyond a pass and its start-up VMs' closes here
    lib.gate_floor_pause_us(pause_ns // 1000)
    start = time.monotonic_ns()
    wall = lib.gate_floor_once_ns()
    whole = time.monotonic_ns() - start
    release = lib.gate_floor_release_ns()
    # The pause is in the call but in neither clock: a pause not made
    # leaves the call shorter than it, one timed as the teardown or on the
    # pass's clock overflows.
    assert whole >= wall + pause_ns + release and release > 0
    assert wall < pause_ns and release < pause_ns
    lib.gate_floor_pause_us(0)
    start = time.monotonic_ns()
    lib.gate_floor_once_ns()
    assert time.monotonic_ns() - start < pause_ns  # and it can be taken back


@needs_kvm
@pytest.mark.parametrize("backend", ["native", "python"])
def test_the_gates_pieces_are_timed_once_and_the_module_is_left_as_it_was(backend):
    kept = {name: getattr(b, name) for name in (*guest_cases._OS_SEAMS, "_release_later")}
    kept_backends = [(k, k.execute) for k in (b._NativeBackend, b._PythonBackend)]
    kit_releaser = b._Kit.releaser
    pieces = guest_cases.gate_pieces(3, backend)
    assert {name: getattr(b, name) for name in kept} == kept
    assert all(k.execute == e for k, e in kept_backends) and b._Kit.releaser is kit_releaser
    # "the rest" is the gate's time less its pieces: a piece timed twice
    # (one nested in another) would drive it below zero.
    gate = guest_cases.gate_pieces(3, backend)  # warm: its kit's releaser was made before
    assert gate["the VM's release"] > 0  # timed even when the kit kept its releaser
    assert pieces["device work (the arrays)"] > 0 and pieces["device open"] > 0
    assert pieces["the rest"] > 0
    assert pieces["total"] > pieces["device work (the arrays)"]
