"""The real-guest layer: long mode as direct-boot VMMs enter it, speed, MSRs.

Unit tests pin the guest's set-up to the values Linux's own boot code uses;
real tests run it on this host's KVM with both backends.  This host is a
kvm_pvm host: stock guests' kernel code is emulated, so the default gate
must refuse here (the positive control is `make test-x86-nested`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import (
    ROOT,
    SECCOMP_INSTALL,
    SYSTEM_PYTHON,
    diagnose,
    needs_kvm,
    needs_root,
    on_pvm_host,
)

import boxlite_syscheck as b

# ── Set-up values against the kernel's own ──────────────────────────────────


def test_gdt_entries_are_the_kernels_boot_descriptors():
    # arch/x86/boot/compressed/head_64.S: __KERNEL_CS 0x00af9a000000ffff and
    # __KERNEL_DS 0x00cf92000000ffff; ours add the accessed bit (9b/93), as
    # GDT_ENTRY_INIT(DESC_CODE64/DESC_DATA64) in arch/x86/kernel/head64.c does.
    assert b._gdt_entry(0xA09A, 0, 0xFFFFF) == 0x00AF9A000000FFFF
    assert b._gdt_entry(0xC092, 0, 0xFFFFF) == 0x00CF92000000FFFF
    assert b._gdt_entry(b._GDT_CODE64, 0, 0xFFFFF) == 0x00AF9B000000FFFF
    assert b._gdt_entry(b._GDT_DATA64, 0, 0xFFFFF) == 0x00CF93000000FFFF


def test_segments_loaded_from_those_descriptors():
    code = b._segment(0x10, 0x00AF9B000000FFFF)
    assert code == {
        "base": 0,
        "limit": 0xFFFFFFFF,
        "selector": 0x10,
        "type": 0xB,
        "s": 1,
        "dpl": 0,
        "present": 1,
        "avl": 0,
        "l": 1,
        "db": 0,
        "g": 1,
        "unusable": 0,
        "padding": 0,
    }
    data = b._segment(0x18, 0x00CF93000000FFFF)
    assert (data["type"], data["l"], data["db"], data["limit"]) == (0x3, 0, 1, 0xFFFFFFFF)


def test_control_registers_are_the_64_bit_boot_state():
    guest = b._long_mode_guest()
    # CR0_STATE in arch/x86/include/asm/processor-flags.h.
    assert guest.sregs["cr0"] == 0x80050033
    assert guest.sregs["cr4"] & b._CR4_PAE
    assert guest.sregs["efer"] == 0x500  # LME | LMA
    assert guest.sregs["cr3"] == b._LM_PML4
    assert guest.sregs["cs"]["selector"] == 0x10 and guest.sregs["ss"]["selector"] == 0x18
    assert guest.long_mode


def test_page_tables_identity_map_the_first_2_mib():
    image = b._long_mode_guest().image
    entry = lambda at: int.from_bytes(image[at : at + 8], "little")  # noqa: E731
    # _KERNPG_TABLE (0x63) for the tables, __PAGE_KERNEL_LARGE_EXEC less
    # _PAGE_GLOBAL (0xe3) for the 2 MiB page (pgtable_types.h).
    assert entry(b._LM_PML4) == b._LM_PDPT | 0x63
    assert entry(b._LM_PDPT) == b._LM_PD | 0x63
    assert entry(b._LM_PD) == 0x0 | 0xE3
    assert entry(b._LM_PD + 8) == 0  # nothing else is mapped
    assert b._LM_SIZE <= 2 << 20


def test_the_guest_is_what_the_assembler_makes(tmp_path):
    """Every marked instruction decodes to what its mark says."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.fail("objdump (binutils) is needed: it comes with the C compiler")
    code, marks, labels = b._long_mode_program()
    raw = tmp_path / "guest.bin"
    raw.write_bytes(code)
    out = subprocess.run(
        [objdump, "-D", "-b", "binary", "-m", "i386:x86-64", str(raw)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    decoded = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0].strip().endswith(":"):
            decoded[int(parts[0].strip()[:-1], 16)] = parts[2].strip()
    expect = {
        "cpuid": "cpuid",
        "lock cmpxchg16b": "lock cmpxchg16b",
        "xsetbv": "xsetbv",
        "xsave64": "xsave64",
        "xrstor64": "xrstor64",
        "hlt": "hlt",
        "mov cr4 (OSXSAVE)": "mov    %rax,%cr4",
        "mov eax (proof value)": f"mov    $0x{b.PROOF_VALUE:x},%eax",
        "dec ecx; jnz (speed loop)": "dec    %ecx",
    }
    for offset, mark in marks.items():
        assert decoded[offset].startswith(expect[mark]), (mark, decoded[offset])
    assert decoded[labels["loop"] + 2].startswith("jne")
    assert b._HOST_LOOP.endswith(b._LOOP_BODY + b"\xc3")


def test_sregs_patches_cover_exactly_the_fields_set():
    abi = b._abi()
    guest = b._long_mode_guest()
    wanted = abi.KvmSregs()
    b._assign(wanted, guest.sregs)
    spans = b._patches(wanted, guest.sregs)
    # cs..ss are contiguous, then gdt, cr0, cr3+cr4 and efer.
    assert spans == [(0, 6 * 24), (192, 10), (224, 8), (240, 16), (264, 8)]
    real = b._real_mode_guest()
    assert b._patches(abi.KvmSregs(), real.sregs) == [(0, 8), (12, 2)]


# ── The exit decoder ────────────────────────────────────────────────────────


def run_head(exit_reason, **fields):
    head = bytearray(b._RUN_HEAD)
    head[8:12] = exit_reason.to_bytes(4, "little")
    for offset, raw in fields.values():
        head[offset : offset + len(raw)] = raw
    return bytes(head)


def test_decoder_reads_the_emulation_failure_and_its_bytes():
    result = b.SmokeResult("python", guest="long-mode")
    insn = bytes.fromhex("f0480fc70f")
    head = run_head(
        17,
        sub=(32, (1).to_bytes(4, "little")),
        n=(36, (4).to_bytes(4, "little")),
        flags=(40, (1).to_bytes(8, "little")),
        size=(48, bytes([len(insn)])),
        insn=(49, insn),
    )
    b._decode_run(result, head)
    assert result.exit_reason == b.KVM_EXIT_INTERNAL_ERROR
    assert result.internal_suberror == 1
    assert result.insn_bytes == insn


def test_decoder_without_the_bytes_flag_keeps_none():
    result = b.SmokeResult("python", guest="long-mode")
    b._decode_run(result, run_head(17, sub=(32, (1).to_bytes(4, "little"))))
    assert result.internal_suberror == 1 and result.insn_bytes == b""


# ── Diagnosis from evidence ─────────────────────────────────────────────────


def long_result(*, ok=True, ratio=1.0, host_ns=0.5, msrs=None, cpuid=None):
    result = b.SmokeResult("python", guest="long-mode")
    result.step = b.STEP_DONE
    result.cpuid = cpuid or {"cx16": True, "xsave": True, "arch_capabilities": False}
    result.msrs = msrs or {"boot_msrs_set": len(b.BOOT_MSRS), "boot_msr_refused": None}
    result.speed = b.Speed(ratio * host_ns, host_ns, 1024)
    if ok:
        result.exit_reason, result.proof, result.stage = b.KVM_EXIT_HLT, b.PROOF_VALUE, 7
        result.cx16_value = b.PROOF_VALUE | b.PROOF_VALUE << 64
    else:
        result.exit_reason, result.internal_suberror = b.KVM_EXIT_INTERNAL_ERROR, 1
        result.instruction, result.rip = "xrstor64", 0x4070
        result.insn_bytes = bytes.fromhex("480fae2f")
    return result


def test_hardware_speed_and_every_instruction_pass():
    result = long_result()
    assert result.ok and result.emulated is False
    assert diagnose(result) is None


def test_emulation_is_its_own_cause_even_when_the_instructions_pass():
    error = diagnose(long_result(ratio=3000), provider="kvm_intel")
    assert error.cause == "guest-emulated" and isinstance(error, b.UnsupportedError)
    assert "about 3,000x the same loop on the host CPU" in str(error)
    assert "VT-x/AMD-V" in error.fix


def test_emulation_under_kvm_pvm_names_pvm_and_its_fix():
    error = diagnose(long_result(ok=False, ratio=2500), provider="kvm_pvm")
    assert error.cause == "guest-emulated-pvm"
    assert "kvm_pvm" in str(error) and "PVM-enabled guest kernel" in error.fix
    # The instruction that failed is evidence of the same cause, not a second one.
    assert "xrstor64 stopped the guest" in error.evidence["stock_kernel"]


def test_a_failed_instruction_at_hardware_speed_names_it():
    error = diagnose(long_result(ok=False))
    assert error.cause == "guest-instruction-failed"
    message = str(error)
    assert (
        "xrstor64 stopped the guest: KVM_EXIT_INTERNAL_ERROR (17), suberror EMULATION (1)"
        in message
    )
    assert "48 0f ae 2f" in message and "0x4070" in message


def test_a_refused_boot_msr_is_named():
    error = diagnose(long_result(msrs={"boot_msrs_set": 3, "boot_msr_refused": "STAR"}))
    assert error.cause == "msr-refused" and "STAR" in str(error)


def test_arch_capabilities_refused_is_a_warning_for_qemu_only():
    msrs = {
        "boot_msrs_set": 10,
        "boot_msr_refused": None,
        "arch_capabilities": {"offered_by_cpuid": True, "accepted": False},
    }
    result = long_result(msrs=msrs)
    assert diagnose(result) is None  # libkrun does not set it
    found = {f.id: f for f in b._guest_findings(result, None)}
    assert found["guest.msrs"].status == "warn"
    assert "-cpu host,-arch-capabilities" in found["guest.msrs"].fix


def test_speed_without_a_host_baseline_decides_nothing():
    result = long_result()
    result.speed = b.Speed(5000.0, None, 1024, "cannot map the host loop executable")
    assert result.emulated is None
    assert diagnose(result) is None
    found = {f.id: f for f in b._guest_findings(result, None)}
    assert found["guest.speed"].status == "skip"
    assert "host not measured" in found["guest.speed"].summary


def test_unknown_engine_is_refused():
    with pytest.raises(b.InvalidArgumentError):
        b.KvmProbe("x86_64").acquire(engine="vmware")
    with pytest.raises(b.InvalidArgumentError, match="'real-mode', 'long-mode', 'aarch64'"):
        b.smoke_test(0, guest="protected-mode")


# ── On this host's real KVM ─────────────────────────────────────────────────


@needs_kvm
def test_long_mode_guest_runs_the_same_on_both_backends(kvm_fd):
    native = b.smoke_test(kvm_fd, backend="native", guest="long-mode")
    python = b.smoke_test(kvm_fd, backend="python", guest="long-mode")
    assert b._outcome(native) == b._outcome(python)
    assert native.api_version == 12 and native.msrs["boot_msrs_set"] == len(b.BOOT_MSRS)
    assert native.speed is not None and python.speed is not None


@needs_kvm
def test_the_vm_the_vcpus_set_up_and_the_warm_up_are_one_array(kvm_fd, backend, mocker):
    """KVM's CPUID answer does not split the long-mode guest's first array:
    the VM, KVM_GET_SUPPORTED_CPUID, the vCPU's set-up and the warm-up run
    go to the backend as one.  A failure in either half is told apart as
    before: in the VM's half nothing is read; in the vCPU's half the CPUID
    was answered, and the MSRs and the speed are not read."""
    key = b._Session.key  # a key of this test's own: no kept array is reused
    mocker.patch.object(b._Session, "key", lambda s, *a: ("one-array-test", *key(s, *a)))
    arrays, array = [], b._Kit.array

    def recorded(kit, plan, key=None):
        built = array(kit, plan, key)
        arrays.append([(op.kind, op.request) for op in built[0][: built[1]]])
        return built

    mocker.patch.object(b._Kit, "array", recorded)
    result = b.smoke_test(kvm_fd, backend=backend, guest="long-mode")
    first = arrays[0]
    requests = [request for kind, request in first if kind == b._OP_IOCTL]
    assert requests.index(b.KVM_GET_SUPPORTED_CPUID) < requests.index(b.KVM_SET_CPUID2)
    assert [kind for kind, _ in first].count(b._OP_RUN) == 1  # the warm-up
    assert first[-1] == (b._OP_IOCTL, b.KVM_GET_REGS)
    assert result.cpuid["cx16"] is True and result.msrs["boot_msrs_set"] == len(b.BOOT_MSRS)

    bogus = 0xAEFF  # _IO(KVMIO, 0xff): an ioctl no KVM descriptor knows
    vcpu_plan = b._vcpu_plan

    def failing_first(session):
        plan = vcpu_plan(session)
        plan.ops.insert(
            0, (b.STEP_SET_CPUID, b._OP_IOCTL, b._VCPU, -1, -1, 0, 0, 0, 0, bogus, 0, 0, 0)
        )
        return plan

    mocker.patch.object(b, "_vcpu_plan", failing_first)
    result = b.smoke_test(kvm_fd, backend=backend, guest="long-mode", timeout=4.5)
    assert (result.step, result.error) == (b.STEP_SET_CPUID, errno.EINVAL)  # a vCPU says EINVAL
    assert result.api_version == b.KVM_API_VERSION and result.cpuid["cx16"] is True
    assert result.msrs == {} and result.speed is None
    mocker.patch.object(b, "_vcpu_plan", vcpu_plan)
    mocker.patch.object(b, "KVM_CREATE_VCPU", bogus)
    result = b.smoke_test(kvm_fd, backend=backend, guest="long-mode", timeout=4.25)
    assert (result.step, result.error) == (b.STEP_CREATE_VCPU, errno.ENOTTY)
    assert result.cpuid == {} and result.msrs == {} and result.speed is None


@on_pvm_host
def test_this_host_emulates_and_stops_at_cmpxchg16b(kvm_fd, backend):
    result = b.smoke_test(kvm_fd, backend=backend, guest="long-mode")
    assert result.step == b.STEP_DONE
    assert result.cpuid["cx16"] is True
    assert result.exit_reason == b.KVM_EXIT_INTERNAL_ERROR
    assert result.internal_suberror == 1  # EMULATION
    assert result.instruction == "lock cmpxchg16b"
    assert result.insn_bytes.startswith(bytes.fromhex("f0480fc70f"))
    assert result.speed.ratio >= b.EMULATION_RATIO, result.speed.as_dict()
    assert diagnose(result, provider="kvm_pvm").cause == "guest-emulated-pvm"


@on_pvm_host
def test_default_gate_refuses_here_and_the_bare_check_passes(backend):
    with pytest.raises(b.UnsupportedError) as caught:
        b.SystemCheck.run(backend=backend)
    assert caught.value.cause == "guest-emulated-pvm"
    with b.SystemCheck.run(backend=backend, engine=None) as host:
        assert host.smoke_tested and host.smoke.guest == "real-mode"


def _kvm_vms() -> int:
    """This process's VM descriptors (a VM's own, not a vCPU's)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:kvm-vm"
        except OSError:  # the listing's own descriptor, closed since
            pass
    return count


@needs_kvm
@pytest.mark.parametrize("engine", [e for e in b.ENGINES if b.ENGINE_REQUIREMENTS[e]["ioctls"]])
def test_the_gates_start_up_ioctls_are_the_head_of_its_guests_first_array(
    kvm_fd, backend, mocker, engine
):
    """The gate makes the engine's start-up VMs and their ioctls at the head
    of its guest's first array (one foreign call with the native backend),
    the guest's own VM right after them, and its answers are those of the
    start-up probe made alone."""
    alone = b._probe_startup_ioctls(kvm_fd, b.ENGINE_REQUIREMENTS[engine]["ioctls"], backend)
    b._wait_for_closes()
    arrays, array = [], b._Kit.array

    def recorded(kit, plan, key=None):
        built = array(kit, plan, key)
        arrays.append(list(built[0][: built[1]]))
        return built

    mocker.patch.object(b._Kit, "array", recorded)
    mocker.patch.object(b, "_probe_startup_ioctls", side_effect=AssertionError("made alone"))
    facts, device, _ = b._PROBE.gate(engine, b.DEFAULT_TIMEOUT, backend)
    if device is not None:
        device.close()
    assert facts.ioctls == alone and len(alone) == len(b.ENGINE_REQUIREMENTS[engine]["ioctls"])
    wanted = b._startup_wanted(alone)
    head = b._startup_count(wanted)
    startup_slots = (b._STARTUP_VM, b._SPLIT_VM)
    first = arrays[0]
    assert all(op.fd in startup_slots or op.fd_out in startup_slots for op in first[:head])
    made = [op.fd_out for op in first[:head] if op.request == b.KVM_CREATE_VM]
    split = "KVM_ENABLE_CAP(SPLIT_IRQCHIP)" in wanted
    assert (
        made
        == [b._STARTUP_VM] * (wanted[0] != "KVM_ENABLE_CAP(SPLIT_IRQCHIP)") + [b._SPLIT_VM] * split
    )
    guest_vm = [(op.request, op.fd_out) for op in first[head : head + 2]]
    assert guest_vm == [(b.KVM_GET_API_VERSION, -1), (b.KVM_CREATE_VM, b._VM)]
    assert sum(op.fd in startup_slots for op in first[head:]) == 0
    assert [op.kind for op in first].count(b._OP_RUN) == 1  # and the warm-up, as before
    b._wait_for_closes()


@needs_kvm
def test_the_start_up_ioctls_are_made_alone_when_the_guest_gets_no_session(kvm_fd, backend, mocker):
    """Where the guest's first array never runs (its memory could not be
    had), the gate still asks the start-up ioctls, in an array of their own,
    and the cause is the guest's."""
    names = b.ENGINE_REQUIREMENTS[b.DEFAULT_ENGINE]["ioctls"]
    alone = b._probe_startup_ioctls(kvm_fd, names, backend)
    failed = b._StepFailed(b.STEP_GUEST_MEMORY, errno.ENOMEM)
    mocker.patch.object(b, "_take_kit", side_effect=failed)
    probe = mocker.spy(b, "_probe_startup_ioctls")
    facts, device, error = b._PROBE.gate(b.DEFAULT_ENGINE, b.DEFAULT_TIMEOUT, backend)
    assert device is None and probe.call_count == 1
    assert facts.ioctls == alone
    assert facts.smoke is not None and facts.smoke.step == b.STEP_GUEST_MEMORY
    assert error is not None and error.evidence.get("answer", "").find("ENOMEM") >= 0, error
    b._wait_for_closes()


@needs_kvm
def test_the_gates_start_up_vms_are_torn_down_by_the_releasing_thread(backend):
    """The start-up VMs (an irqchip and a PIT: the longest teardown of all)
    are not closed on the caller's clock: the releasing thread closes them,
    after the check, and none is left after it."""
    import threading

    b._wait_for_closes()
    before = _kvm_vms()
    gate = threading.Event()
    releaser = b._cached("releaser", b._start_releaser)
    releaser.put(lambda: gate.wait(30) or None)  # busy until the gate opens
    try:
        with pytest.raises(b.BoxliteError):  # this host refuses the default gate
            b.SystemCheck.run(backend=backend)
        wanted = b._startup_wanted(b.ENGINE_REQUIREMENTS[b.DEFAULT_ENGINE]["ioctls"])
        split = "KVM_ENABLE_CAP(SPLIT_IRQCHIP)" in wanted
        assert _kvm_vms() - before == 1 + (split and len(wanted) > 1)
    finally:
        gate.set()
    b._wait_for_closes()
    assert _kvm_vms() == before


@needs_kvm
def test_start_up_answers_keep_each_ioctls_own_errno(kvm_fd, backend):
    """Each start-up ioctl's answer is its own: KVM refuses a PIT on a VM
    without the in-kernel irqchip (ENOENT) and makes one on a VM with it;
    the split irqchip, on a VM of its own, answers apart."""
    abi, runner = b._abi(), b._backend_for(backend)
    expected = {
        ("KVM_SET_TSS_ADDR", "KVM_CREATE_PIT2"): {
            "KVM_SET_TSS_ADDR": 0,
            "KVM_CREATE_PIT2": errno.ENOENT,
        },
        ("KVM_CREATE_IRQCHIP", "KVM_CREATE_PIT2"): {"KVM_CREATE_IRQCHIP": 0, "KVM_CREATE_PIT2": 0},
        ("KVM_CREATE_PIT2", "KVM_ENABLE_CAP(SPLIT_IRQCHIP)"): {
            "KVM_CREATE_PIT2": errno.ENOENT,
            "KVM_ENABLE_CAP(SPLIT_IRQCHIP)": 0,
        },
        # In any order: each VM is made before its first ioctl.
        ("KVM_ENABLE_CAP(SPLIT_IRQCHIP)", "KVM_SET_TSS_ADDR"): {
            "KVM_ENABLE_CAP(SPLIT_IRQCHIP)": 0,
            "KVM_SET_TSS_ADDR": 0,
        },
    }
    for wanted, answers in expected.items():
        state, out = abi.State(), abi.Outcome()
        state.fds[:] = [kvm_fd] + [-1] * (b._FD_SLOTS - 1)
        ops, count = b._startup_array(wanted)
        vms = {name == "KVM_ENABLE_CAP(SPLIT_IRQCHIP)" for name in wanted}  # one VM per kind
        assert count == b._startup_count(wanted) == len(wanted) + len(vms)
        try:
            runner.execute(ops, count, state, out)
        finally:
            runner.release(state)
        assert b._startup_answers(wanted, out.values) == answers, wanted


@needs_kvm
def test_start_up_ioctls_without_their_vm_answer_not_tried(backend):
    """Every start-up operation is soft: where the VMs are not made (here
    the KVM descriptor is not open), each ioctl answers -1, "not tried",
    and the array goes on to its end."""
    wanted = tuple(b._STARTUP_STEPS)
    abi, runner = b._abi(), b._backend_for(backend)
    state, out = abi.State(), abi.Outcome()
    state.fds[:] = [-1] * b._FD_SLOTS
    ops, count = b._startup_array(wanted)
    runner.execute(ops, count, state, out)
    assert (out.step, out.op_index) == (-1, count - 1)
    assert out.values[b._V_STARTUP_VM] == out.values[b._V_SPLIT_VM] == -errno.EBADF
    assert b._startup_answers(wanted, out.values) == dict.fromkeys(wanted, -1)


@needs_kvm
def test_the_gate_leaks_nothing(backend):
    def fds():
        return sorted(os.listdir("/proc/self/fd"))

    b.check()
    b._wait_for_closes()  # the probe VMs are closed in the background
    before = fds()
    for _ in range(50):
        try:
            b.SystemCheck.run(backend=backend).close()
        except b.UnsupportedError:
            pass
    b.check()
    b._wait_for_closes()
    assert fds() == before


# ── MSRs refused for real: a seccomp filter on KVM_SET_MSRS ─────────────────

SECCOMP_SCRIPT = (
    SECCOMP_INSTALL
    + r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
# KVM_SET_MSRS then "succeeds" having set no MSR: what a refusing KVM says.
_install_seccomp(int(sys.argv[2]), 0)
fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
out = {}
for backend in ("native", "python"):
    r = b.smoke_test(fd, backend=backend, guest="long-mode")
    found = {f.id: f.summary for f in b._guest_findings(r, None)}
    out[backend] = {"msrs": r.msrs, "msr_finding": found.get("guest.msrs"),
                    "outcome": list(map(str, b._outcome(r)))}
print(json.dumps(out))
"""
)


@needs_root
def test_a_seccomp_filter_that_refuses_msrs_is_seen_by_both_backends():
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", SECCOMP_SCRIPT, str(ROOT), str(b.KVM_SET_MSRS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    for backend in ("native", "python"):
        assert out[backend]["msrs"]["boot_msrs_set"] == 0
        assert out[backend]["msrs"]["boot_msr_refused"] == "IA32_SYSENTER_CS"
        assert "KVM refuses the boot MSR IA32_SYSENTER_CS" in out[backend]["msr_finding"]
    assert out["native"]["outcome"] == out["python"]["outcome"]


def test_importing_runs_no_guest_and_loads_nothing():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import boxlite_syscheck as b; "
        "print(sorted(b._CACHE), 'ctypes' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[] False"


# ── arm64: the guest as data, decoded here; run for real by make test-aarch64 ─


def test_arm64_ioctl_numbers():
    # arch/arm64/include/uapi/asm/kvm.h via include/uapi/linux/kvm.h:
    # _IOW(KVMIO, 0xae, struct kvm_vcpu_init) and friends (32 and 16 bytes).
    assert b.KVM_ARM_VCPU_INIT == 0x4020AEAE
    assert b.KVM_ARM_PREFERRED_TARGET == 0x8020AEAF
    assert b.KVM_SET_ONE_REG == 0x4010AEAC and b.KVM_GET_ONE_REG == 0x4010AEAB
    assert b.ARM64_REG_PC == 0x6030000000100040 and b.ARM64_REG_X0 == 0x6030000000100000


def test_arm64_guest_code_is_the_proof_store():
    guest = b._aarch64_guest()
    words = [int.from_bytes(guest.image[i : i + 4], "little") for i in range(0, 20, 4)]
    # movz x0,#0x117e; movk x0,#0xb0c5,lsl #16; movz x1,#0x10,lsl #16; str w0,[x1]; b .
    assert words == [0xD2822FC0, 0xF2B618A0, 0xD2A00201, 0xB9000020, 0x14000000]
    assert guest.base == guest.entry == 0x10000 and guest.arch == "aarch64"


def arm_result(phys=0x100000, data=b.PROOF_VALUE, x0=b.PROOF_VALUE, exit_reason=6):
    result = b.SmokeResult("python", guest="aarch64")
    result.step, result.exit_reason, result.proof = b.STEP_DONE, exit_reason, x0
    result.mmio = {"phys_addr": phys, "data": data, "len": 4, "is_write": True}
    return result


def test_arm64_passes_only_on_the_mmio_proof():
    assert arm_result().ok and diagnose(arm_result()) is None
    assert not arm_result(phys=0x200000).ok
    assert diagnose(arm_result(x0=0)).cause == "smoke-no-proof"
    failed = diagnose(arm_result(exit_reason=b.KVM_EXIT_INTERNAL_ERROR))
    assert failed.cause == "smoke-exit" and "KVM_EXIT_MMIO" in str(failed)
    assert "EL2" in failed.fix and "kvm_intel" not in failed.fix


def test_arm64_probe_uses_the_arm64_guest():
    assert b.KvmProbe("aarch64")._guest_kind(None) == "aarch64"
    assert b.KvmProbe("aarch64")._guest_kind("libkrun") == "aarch64"
    assert b.KvmProbe("aarch64").can_smoke_test


def measured(kvm_fd, mocker, samples, host_ns=1.0):
    """The long-mode guest run for real, its speed samples these: (result, samples taken)."""
    said = [(sample, None) for sample in samples]  # each without the final run
    slope = mocker.patch.object(b, "_guest_slope", side_effect=said)
    mocker.patch.object(b, "_host_ns_per_iteration", return_value=(host_ns, ""))
    result = b.smoke_test(kvm_fd, guest="long-mode")
    return result, slope.call_count


@needs_kvm
@pytest.mark.parametrize(
    "samples",
    [
        # A first sample can be slow for reasons that pass (a nested emulator
        # translating KVM's code the first time).
        [(300.0, 131072), (0.9, 131072)],
        # A stall inside the short run is divided by its 1,023 iterations:
        # two "emulated" samples that disagree are stalls, not emulation.
        [(300.0, 1024), (900.0, 1024), (0.9, 131072)],
    ],
)
def test_slow_samples_that_disagree_do_not_fail_a_good_host(kvm_fd, mocker, samples):
    result, taken = measured(kvm_fd, mocker, samples)
    assert taken == len(samples)
    assert result.speed.guest_ns == 0.9 and result.emulated is False


@needs_kvm
def test_a_slow_host_stays_slow_when_measured_again(kvm_fd, mocker):
    result, taken = measured(kvm_fd, mocker, [(900.0, 1024), (950.0, 1024)], host_ns=0.5)
    assert taken == 2 and result.speed.guest_ns == 900.0 and result.emulated


@needs_kvm
@pytest.mark.parametrize(
    "later",
    [
        # Each of the later sample's short runs stalls as the first did:
        # spread over twice the iterations, the stall reads half as slow.
        {b._V_T_SHORT: 1, b._V_T_SHORT2: 1},
        # One run of it stalls twice as long (two interrupts): per iteration
        # that agrees with the first sample, but the other run is the faster.
        {b._V_T_SHORT: 2},
    ],
    ids=["each-run-once", "one-run-twice"],
)
@pytest.mark.parametrize("backend", ["native", "python"])
def test_a_stall_in_the_short_runs_is_not_taken_for_emulation(kvm_fd, mocker, backend, later):
    """The nested host's failure: an interrupt costs a short run one more
    exit and entry, a fixed time.  Here the real runs are made, the host
    loop is said to be as slow as this host's emulated guest (so the guest
    alone would pass), and the first sample's short run gets a stall that
    makes its 1,023 iterations look 60 times the host's; the later sample's
    runs get ``later`` times that stall.  Emulation would cost the same per
    iteration in the later sample's twice longer runs; a stall does not."""
    guest_ns = b.smoke_test(kvm_fd, guest="long-mode", backend=backend).speed.guest_ns
    host_ns = guest_ns / 0.8  # the guest loop alone: 0.8x the host's
    stall = int(60 * host_ns * (b._SPEED_SHORT - 1))
    mocker.patch.object(b, "_host_ns_per_iteration", return_value=(host_ns, ""))
    execute, shorts = b._Session.execute, []

    def stalled(session, plan, key=None):
        # The stall goes into the runs' times before the array runs (each
        # run adds its own): the array's own bounds see it, as in a real one.
        if key is not None and key[0] == "slope":
            shorts.append(key[-3:-1])
            for slot, times in (later if len(shorts) > 1 else {b._V_T_SHORT: 1}).items():
                session.out.values[slot] += times * stall
        return execute(session, plan, key)

    mocker.patch.object(b._Session, "execute", stalled)
    result = b.smoke_test(kvm_fd, guest="long-mode", backend=backend)
    assert shorts[:2] == [(b._SPEED_SHORT, False), (2 * b._SPEED_SHORT, True)], shorts
    assert result.emulated is False and result.speed.ratio < b.EMULATION_RATIO, result.speed


@needs_kvm
def test_a_first_sample_that_decides_makes_the_final_run_in_its_array(kvm_fd, backend, mocker):
    """On a host whose guest runs at speed, the whole speed probe and the
    final run are one array: its short runs, its long runs (an OP_UNLESS
    lets them run while the short ones are within the noise) and, while
    the sample is one that ends the probe, the final run.  Here the real
    runs are made, the host loop is said to be slower than this host's
    emulated guest, and the noise bound is raised so that the long runs are
    made; the outcome must be the one the final run made alone gives."""
    guest_ns = b.smoke_test(kvm_fd, guest="long-mode", backend=backend).speed.guest_ns
    mocker.patch.object(b, "_host_ns_per_iteration", return_value=(guest_ns / 0.8, ""))
    mocker.patch.object(b, "_SPEED_SLOW_NS", 1 << 40)
    arrays, execute = [], b._Session.execute

    def recorded(session, plan, key=None):
        arrays.append(key[0])
        return execute(session, plan, key)

    mocker.patch.object(b._Session, "execute", recorded)
    merged = b.smoke_test(kvm_fd, guest="long-mode", backend=backend)
    assert arrays == ["vcpu", "slope"]
    assert merged.speed.iterations == b._SPEED_LONG and merged.emulated is False
    # No first sample may decide inside its array: the final run goes alone.
    mocker.patch.object(b, "_deciding_bounds", return_value=(0, 0))
    del arrays[:]
    alone = b.smoke_test(kvm_fd, guest="long-mode", backend=backend)
    assert arrays == ["vcpu", "slope", "final"]
    assert alone.speed.iterations == b._SPEED_LONG and alone.emulated is False
    assert b._outcome(merged) == b._outcome(alone) and merged.step == b.STEP_DONE


def test_the_deciding_bounds_are_the_probes_own_in_whole_ns():
    """The first sample ends the probe when IMPLAUSIBLE x host <= its ns
    per iteration < EMULATION x host: in whole ns of the long runs' loop."""
    iterations = b._SPEED_LONG - 1
    for host_ns in (0.29, 1.0, 3.7):
        lo, hi = b._deciding_bounds(host_ns)
        for extra in (lo - 1, lo, hi - 1, hi):
            per = extra / iterations
            python = b._IMPLAUSIBLE_RATIO * host_ns <= per < b.EMULATION_RATIO * host_ns
            assert (lo <= extra < hi) == python, (host_ns, extra)
    assert b._deciding_bounds(None) == (0, (1 << 63) - 1)
    assert b._deciding_bounds(1e300) == ((1 << 63) - 1, (1 << 63) - 1)


@needs_kvm
def test_samples_that_never_agree_stop_after_the_last_try(kvm_fd, mocker):
    """However noisy the host, the probe stops: the fastest of its samples decides."""
    spread = [(100.0 * 3**k, 1024) for k in range(b._SPEED_TRIES)]
    result, taken = measured(kvm_fd, mocker, spread)
    assert taken == b._SPEED_TRIES
    assert result.speed.guest_ns == 100.0 and result.emulated


@needs_kvm
def test_an_impossible_speed_is_never_a_pass(kvm_fd, mocker):
    """A guest loop faster than the host CPU is a broken measurement: it is
    measured again, and if it stays broken no speed verdict is drawn."""
    result, _ = measured(kvm_fd, mocker, [(1e-5, 131072)] * b._SPEED_TRIES, host_ns=3.0)
    assert result.emulated is None and "inconsistent" in result.speed.note
    result, _ = measured(kvm_fd, mocker, [(1e-5, 131072), (3.2, 131072)], host_ns=3.0)
    assert result.speed.guest_ns == 3.2 and result.emulated is False


CPU_CLOCK_REFUSED = (
    SECCOMP_INSTALL
    + r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
backends = ("native", "python")
before = [b.smoke_test(fd, backend=k, guest="long-mode").emulated for k in backends]
# clock_gettime (228) of CLOCK_THREAD_CPUTIME_ID (3) answers EPERM from now on.
_install_seccomp(3, 1, nr=228, first=16)
try:
    time.thread_time_ns()
    raise SystemExit("the filter let the CPU clock through")
except PermissionError:
    pass
after = [b.smoke_test(fd, backend=k, guest="long-mode").speed for k in backends]
print(json.dumps({"before": before, "after": [[s.ratio, s.emulated] for s in after]}))
"""
)


@needs_root
def test_a_refused_cpu_clock_times_the_runs_on_the_monotonic_one():
    """A policy may refuse the thread's CPU clock: the runs are then timed
    on CLOCK_MONOTONIC, and the speed verdict is the same as before."""
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", CPU_CLOCK_REFUSED, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    for (ratio, emulated), was in zip(out["after"], out["before"]):
        assert ratio is not None and ratio > b._IMPLAUSIBLE_RATIO
        assert emulated == was


CONTENDED = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
os.sched_setaffinity(0, {int(sys.argv[2])})
os.nice(int(sys.argv[3]))
import boxlite_syscheck as b
# Runs long enough that the busy loop's turns fall inside them: the first
# short run of the guest loop is made 40,000 iterations (about 0.1 s here,
# where the guest's kernel code is emulated; the second sample's twice
# that), the host loop 2**27.  With a tenth of the CPU the second one takes
# about 2 s of wall time: the bound is 20 s.
b._SPEED_SHORT = 40_000
fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
speed = b.smoke_test(fd, backend=sys.argv[4], guest="long-mode", timeout=20).speed
print(json.dumps([speed.guest_ns, b._host_ns_per_iteration(1 << 27)[0]]))
"""


@needs_kvm
@pytest.mark.parametrize("backend", ["native", "python"])
def test_a_task_sharing_the_cpu_is_not_charged_to_the_guest(backend):
    """On a host with one CPU for the check, another task (or a thread of
    ours closing an earlier VM) takes turns with the guest's runs: they are
    timed on the thread's CPU clock, so the guest's speed and the host loop's
    are what they are alone.  Here the check runs at nice 10 beside a busy
    loop on the same CPU, so it has about a tenth of the CPU: a wall clock
    would make both times about ten times longer."""
    cpu = max(os.sched_getaffinity(0))

    def speeds(nice: int) -> tuple[float, float]:
        done = subprocess.run(
            [sys.executable, "-c", CONTENDED, str(ROOT), str(cpu), str(nice), backend],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        guest_ns, host_ns = json.loads(done.stdout)
        return guest_ns, host_ns

    alone = speeds(0)
    busy = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"]
    )
    try:
        shared = speeds(10)
    finally:
        busy.kill()
        busy.wait()
    assert shared[0] < 3 * alone[0], (alone, shared)
    assert shared[1] < 3 * alone[1], (alone, shared)
