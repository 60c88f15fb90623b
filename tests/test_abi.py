"""Kernel ABI: ioctl numbers and structure layouts against the kernel headers."""

from __future__ import annotations

import ctypes
import errno
import shutil
import struct
import subprocess

import pytest

import boxlite_syscheck as b

# From <linux/kvm.h> on x86_64 (gcc -E of KVM_* macros).
PINNED = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_SET_SIGNAL_MASK": 0x4004AE8B,
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_ioctl_numbers_are_pinned(name):
    assert getattr(b, name) == PINNED[name]


def test_structure_sizes_match_the_kernel():
    abi = b._abi()
    assert ctypes.sizeof(abi.KvmRegs) == b._SIZEOF_KVM_REGS == 144
    assert ctypes.sizeof(abi.KvmSregs) == b._SIZEOF_KVM_SREGS == 312
    assert ctypes.sizeof(abi.KvmUserspaceMemoryRegion) == b._SIZEOF_KVM_USERSPACE_MEMORY_REGION
    assert ctypes.sizeof(abi.SigEvent) == 64
    assert abi.KvmSregs.cs.offset == 0 and abi.KvmSegment.selector.offset == 12


def test_a_plan_packs_into_the_librarys_operation_layout():
    # The packed bytes must land in struct kvmsmoke_op's fields, and an
    # empty plan is still an array (of one zeroed operation, count 0).
    empty, count = b._Plan().build()
    assert count == 0 and len(empty) == 1 and bytes(empty) == bytes(ctypes.sizeof(b._abi().Op))
    plan = b._Plan()
    plan.ioctl(b.STEP_CREATE_VM, b._KVM, b.KVM_CREATE_VM, 7, fd_out=b._VM, soft=True)
    plan.copy(b.STEP_SET_SREGS, 0x1000, 0x2000, 24)
    ops, count = plan.build()
    assert count == 2
    assert (ops[0].step, ops[0].kind, ops[0].fd_out) == (b.STEP_CREATE_VM, b._OP_IOCTL, b._VM)
    assert (ops[0].request, ops[0].arg, ops[0].flags) == (b.KVM_CREATE_VM, 7, b._OPF_SOFT)
    assert (ops[1].kind, ops[1].arg, ops[1].src, ops[1].len) == (b._OP_COPY, 0x1000, 0x2000, 24)


def test_the_python_backend_reads_an_array_back_as_the_plan_wrote_it():
    # It reads each operation as one packed tuple (_OP_FORMAT), not field
    # by field: the layout must be struct kvmsmoke_op's, a field moved in
    # the structure or the format shows here.
    assert struct.calcsize(b._OP_FORMAT) == b._OP_SIZE == ctypes.sizeof(b._abi().Op)
    plan = b._Plan()
    plan.ioctl(b.STEP_CREATE_VCPU, b._VM, b.KVM_CREATE_VCPU, 3, fd_out=b._VCPU, value=5)
    plan.run(123_456, 40, b._V_T_GUEST)
    ops, count = plan.build()
    ops[1].src = 0xC00C1E
    raw = ctypes.string_at(ctypes.addressof(ops), count * b._OP_SIZE)
    back = list(struct.iter_unpack(b._OP_FORMAT, raw))
    for op, fields in zip(ops, back):
        named = [getattr(op, name) for name, *_ in b._abi().Op._fields_]
        assert tuple(named) == fields
    assert back[0][:5] == (b.STEP_CREATE_VCPU, b._OP_IOCTL, b._VM, b._VCPU, 5)
    assert back[1][9:12] == (123_456, 40, 0xC00C1E)


HEADER_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/kvm.h>
#define P(x) printf(#x " %lu\n", (unsigned long)(x));
int main(void) {
  P(KVM_GET_API_VERSION) P(KVM_CREATE_VM) P(KVM_CHECK_EXTENSION) P(KVM_GET_VCPU_MMAP_SIZE)
  P(KVM_CREATE_VCPU) P(KVM_SET_USER_MEMORY_REGION) P(KVM_RUN) P(KVM_GET_REGS) P(KVM_SET_REGS)
  P(KVM_GET_SREGS) P(KVM_SET_SREGS) P(KVM_SET_SIGNAL_MASK) P(KVM_API_VERSION)
  P(KVM_EXIT_HLT) P(KVM_EXIT_FAIL_ENTRY) P(KVM_EXIT_INTERNAL_ERROR) P(KVM_EXIT_SHUTDOWN)
  P(KVM_CAP_IMMEDIATE_EXIT) P(KVM_CAP_MAX_VCPUS) P(KVM_CAP_NR_MEMSLOTS)
  P(offsetof(struct kvm_run, exit_reason)) P(offsetof(struct kvm_run, fail_entry.cpu))
  P(offsetof(struct kvm_run, fail_entry.hardware_entry_failure_reason))
  P(offsetof(struct kvm_run, internal.suberror)) P(sizeof(struct kvm_run))
  return 0;
}
"""


def test_constants_match_the_installed_kernel_headers(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    source = tmp_path / "abi.c"
    source.write_text(HEADER_PROGRAM)
    built = subprocess.run(
        [cc, "-o", str(tmp_path / "abi"), str(source)], capture_output=True, text=True
    )
    if built.returncode != 0 and "linux/kvm.h" in built.stderr:
        pytest.skip("no <linux/kvm.h>")
    assert built.returncode == 0, built.stderr
    out = subprocess.run([str(tmp_path / "abi")], capture_output=True, text=True, check=True)
    values = dict(line.rsplit(" ", 1) for line in out.stdout.splitlines())
    values = {k: int(v) for k, v in values.items()}
    for name in PINNED:
        assert values[name] == getattr(b, name), name
    assert values["KVM_API_VERSION"] == b.KVM_API_VERSION
    assert values["KVM_EXIT_HLT"] == b.KVM_EXIT_HLT
    assert values["KVM_EXIT_FAIL_ENTRY"] == b.KVM_EXIT_FAIL_ENTRY
    assert values["KVM_EXIT_INTERNAL_ERROR"] == b.KVM_EXIT_INTERNAL_ERROR
    assert values["KVM_EXIT_SHUTDOWN"] == b.KVM_EXIT_SHUTDOWN
    assert values["KVM_CAP_IMMEDIATE_EXIT"] == b.KVM_CAPS["IMMEDIATE_EXIT"]
    assert values["KVM_CAP_MAX_VCPUS"] == b.KVM_CAPS["MAX_VCPUS"]
    assert values["KVM_CAP_NR_MEMSLOTS"] == b.KVM_CAPS["NR_MEMSLOTS"]
    assert values["offsetof(struct kvm_run, exit_reason)"] == b._RUN_EXIT_REASON
    assert values["offsetof(struct kvm_run, fail_entry.cpu)"] == b._RUN_FAIL_ENTRY_CPU
    assert (
        values["offsetof(struct kvm_run, fail_entry.hardware_entry_failure_reason)"]
        == b._RUN_FAIL_ENTRY_REASON
    )
    assert values["offsetof(struct kvm_run, internal.suberror)"] == b._RUN_INTERNAL_SUBERROR
    assert values["sizeof(struct kvm_run)"] == b._SIZEOF_KVM_RUN_MIN


def test_hvf_codes_follow_hv_error_h():
    # err_system(0x3e) | err_sub(0xba5) from <mach/error.h>, then the offsets.
    base = ((0x3E & 0x3F) << 26) | ((0xBA5 & 0xFFF) << 14)
    assert base == 0xFAE94000
    assert b.HV_BUSY == base + 2
    assert b.HV_NO_RESOURCES == base + 5
    assert b.HV_DENIED == base + 7
    assert b.HV_UNSUPPORTED == base + 0xF
    # BoxLite's signed constants, as a C int would hold them.
    assert b.HV_NO_RESOURCES - (1 << 32) == -85377019
    assert b.HV_BUSY - (1 << 32) == -85377022
    assert b.HV_DENIED - (1 << 32) == -85377017


def test_the_trivial_guest_decodes_to_mov_eax_proof_then_hlt(tmp_path):
    """BoxLite's real-mode guest, read back by the disassembler in 16-bit mode."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.fail("objdump (binutils) is needed: it comes with the C compiler")
    raw = tmp_path / "guest.bin"
    raw.write_bytes(b._real_mode_guest().image)
    out = subprocess.run(
        [objdump, "-D", "-b", "binary", "-m", "i8086", str(raw)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    decoded = [line.split("\t")[-1].strip() for line in out.splitlines() if "\t" in line]
    assert decoded == [f"mov    $0x{b.PROOF_VALUE:x},%eax", "hlt"]


def test_the_structures_a_check_does_not_use_are_made_only_when_asked_for():
    import threading

    abi = b._Abi()
    assert "KvmCpuid2" not in vars(abi) and "SigSet" not in vars(abi)
    seen: list[type] = []
    barrier = threading.Barrier(8)

    def ask() -> None:
        barrier.wait()
        seen.append(abi.KvmMsrs)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == 1, "every thread got the same class"
    assert abi.KvmCpuid2 is vars(abi)["KvmCpuid2"]  # its group came with it
    assert "SigSet" not in vars(abi)
    assert ctypes.sizeof(abi.KvmMsrs) == 8 + 16 * len(b.BOOT_MSRS)
    assert ctypes.sizeof(abi.KvmCpuid2) == 8 + 40 * b._MAX_CPUID_ENTRIES
    assert ctypes.sizeof(abi.Itimerspec) == 32
    with pytest.raises(AttributeError):
        abi.NoSuchStructure  # noqa: B018


@pytest.mark.parametrize(
    ("values", "goes_on"),
    [
        ([10, 20, 3, 5, 7, 8], True),  # x = 10 - 3 = 7, in [7, 8)
        ([11, 20, 3, 5, 7, 8], False),  # x = 8: the upper bound is left out
        ([9, 20, 3, 5, 7, 8], False),  # x = 6: below the lower bound
        ([20, 10, 5, 3, 7, 8], True),  # each pair's smaller counts: 10 - 3
        ([0, 0, 5, 5, 0, 2], True),  # x = -5 counts as 1, in [0, 2)
        ([0, 0, 5, 5, 2, 9], False),  # ... and 1 is below 2
    ],
)
def test_an_unless_ends_its_array_outside_its_bounds_on_both_backends(backend, values, goes_on):
    """OP_UNLESS, which lets the speed probe's first sample go on to its
    long runs and its final run in one array: the operations after it run
    only while its bound holds; otherwise the array ends there, all run."""
    abi = b._abi()
    source, marks = ctypes.create_string_buffer(b"\x01\x02"), ctypes.create_string_buffer(2)
    plan = b._Plan()
    plan.copy(b.STEP_RUN, ctypes.addressof(marks), ctypes.addressof(source), 1)
    plan.unless(b.STEP_RUN, (0, 1, 2, 3, 4, 5))
    plan.copy(b.STEP_RUN, ctypes.addressof(marks) + 1, ctypes.addressof(source) + 1, 1)
    ops, count = plan.build()
    state, out = abi.State(), abi.Outcome()
    state.fds[:] = [-1] * b._FD_SLOTS
    out.values[:6] = values
    out.stopped = 1  # left from an earlier array: cleared when this one starts
    b._backend_for(backend).execute(ops, count, state, out)
    assert out.step == -1 and out.stopped == (not goes_on)
    assert out.op_index == (2 if goes_on else 1)
    assert marks.raw == (b"\x01\x02" if goes_on else b"\x01\x00")


def test_an_unless_naming_a_slot_past_the_values_fails_on_both_backends(backend):
    abi = b._abi()
    plan = b._Plan()
    plan.unless(b.STEP_RUN, (0, 1, 2, b._VALUE_SLOTS, 4, 5))
    ops, count = plan.build()
    state, out = abi.State(), abi.Outcome()
    state.fds[:] = [-1] * b._FD_SLOTS
    b._backend_for(backend).execute(ops, count, state, out)
    assert (out.step, out.error, out.stopped) == (b.STEP_RUN, errno.EINVAL, 0)
