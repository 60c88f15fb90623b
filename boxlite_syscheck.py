"""Can this host run hardware-accelerated virtual machines, and if not, why?

boxlite_syscheck is a Python port of the host check that BoxLite 0.9.1 runs
before it starts a micro-VM.  It does not guess from CPU flags, and "usable"
means a real guest can run: on Linux it opens ``/dev/kvm`` the way a VMM
will, checks the capabilities and start-up ioctls the engine needs, enters
64-bit long mode in a throwaway VM as direct-boot VMMs do, runs what a stock
kernel runs early (``lock cmpxchg16b``, ``xsave``...) and times guest code
against the host CPU, every run bounded in time (arm64: a guest that proves
itself by MMIO); on macOS it asks the kernel whether Hypervisor.framework is
available.  When the host cannot run VMs, the error names what was tried,
what the operating system answered and the one fix for that cause.

Library use::

    import boxlite_syscheck

    with boxlite_syscheck.SystemCheck.run() as host:   # raises BoxliteError
        print(host.smoke)                               # proof the guest ran

    report = boxlite_syscheck.check()                   # never raises
    print(report.verdict, report.engines)

Command line::

    python -m boxlite_syscheck [--format text|json|prometheus|nfd] [--quiet]
                               [--strict] [--timeout S] [--engine NAME|none]

Exit codes: 0 usable, 1 not usable, 2 usage error, 3 the checker itself
failed, 141 standard output closed.  The module is one file with no
dependencies outside the standard library; copy it into a project as it is.
``libkvmsmoke.so`` (built by ``make`` from ``kvm_smoke.c``) is used when it
sits next to this file, or at the absolute path in
``$BOXLITE_SYSCHECK_KVMSMOKE``; without it a pure-Python backend with the
same contract runs the guests.
"""

from __future__ import annotations

import _thread
import errno
import io
import os
import sys

__all__ = [
    "AlreadyExistsError",
    "BoxliteError",
    "ConfigError",
    "DatabaseError",
    "EngineError",
    "ExecutionError",
    "Finding",
    "HvfProbe",
    "HypervisorProbe",
    "ImageError",
    "InternalError",
    "InvalidArgumentError",
    "InvalidStateError",
    "KvmProbe",
    "MetadataError",
    "NetworkError",
    "NotFoundError",
    "PortalError",
    "Report",
    "ResourceExhaustedError",
    "RpcError",
    "RpcTransportError",
    "SmokeResult",
    "StorageError",
    "StoppedError",
    "SystemCheck",
    "UnsupportedEngineError",
    "UnsupportedError",
    "UnsupportedPlatformProbe",
    "check",
    "diagnose_create_failure",
    "hypervisor_probe",
    "main",
    "smoke_test",
]

__version__ = "0.2.0"

# Lets mypy see the imports below without paying for them at import time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes
    from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
    from typing import Any, TypeVar

    _T = TypeVar("_T")

# ── Constants and kernel ABI ────────────────────────────────────────────────

KVM_DEVICE = "/dev/kvm"
#: How long one KVM_RUN may take before the check gives up, in seconds.
DEFAULT_TIMEOUT = 2.0
#: The longest bound on one KVM_RUN that ``timeout`` accepts, in seconds.
MAX_TIMEOUT = 3600.0
#: Names an absolute path to libkvmsmoke.so, used instead of the copy next to
#: this file.  Relative paths are refused: native code is never searched for.
LIBRARY_ENV = "BOXLITE_SYSCHECK_KVMSMOKE"
_LIBRARY_NAME = "libkvmsmoke.so"
#: The native library must report this ABI version (KVMSMOKE_ABI_VERSION).
_NATIVE_ABI_VERSION = 7

# include/uapi/linux/kvm.h: KVM_API_VERSION has been 12 since Linux 2.6.22.
KVM_API_VERSION = 12
# misc device major and KVM's minor (include/linux/miscdevice.h KVM_MINOR).
KVM_DEVICE_MAJOR = 10
KVM_DEVICE_MINOR = 232

# include/uapi/asm-generic/ioctl.h (x86 and arm64 use the generic layout).
_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """Encode an ioctl request number as the kernel's _IOC() macro does."""
    return (
        (direction << _IOC_DIRSHIFT)
        | (kind << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


_KVMIO = 0xAE
_RW = _IOC_READ | _IOC_WRITE
# Sizes of the x86_64 structures (arch/x86/include/uapi/asm/kvm.h); the
# ctypes definitions in _Abi are checked against them in the tests.
_SIZEOF_KVM_REGS = 144
_SIZEOF_KVM_SREGS = 312
_SIZEOF_KVM_USERSPACE_MEMORY_REGION = 32
_SIZEOF_KVM_SIGNAL_MASK = 4
_SIZEOF_KVM_MSR_LIST = 4  # struct kvm_msr_list header: nmsrs
_SIZEOF_KVM_CPUID2 = 8  # struct kvm_cpuid2 header: nent, padding
_SIZEOF_KVM_MSRS = 8  # struct kvm_msrs header: nmsrs, pad
_SIZEOF_KVM_PIT_CONFIG = 64
_SIZEOF_KVM_ENABLE_CAP = 104

KVM_GET_API_VERSION = _ioc(_IOC_NONE, _KVMIO, 0x00, 0)
KVM_CREATE_VM = _ioc(_IOC_NONE, _KVMIO, 0x01, 0)
KVM_GET_MSR_INDEX_LIST = _ioc(_RW, _KVMIO, 0x02, _SIZEOF_KVM_MSR_LIST)
KVM_CHECK_EXTENSION = _ioc(_IOC_NONE, _KVMIO, 0x03, 0)
KVM_GET_VCPU_MMAP_SIZE = _ioc(_IOC_NONE, _KVMIO, 0x04, 0)
KVM_GET_SUPPORTED_CPUID = _ioc(_RW, _KVMIO, 0x05, _SIZEOF_KVM_CPUID2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _ioc(_RW, _KVMIO, 0x0A, _SIZEOF_KVM_MSR_LIST)
KVM_CREATE_VCPU = _ioc(_IOC_NONE, _KVMIO, 0x41, 0)
KVM_SET_USER_MEMORY_REGION = _ioc(_IOC_WRITE, _KVMIO, 0x46, _SIZEOF_KVM_USERSPACE_MEMORY_REGION)
KVM_SET_TSS_ADDR = _ioc(_IOC_NONE, _KVMIO, 0x47, 0)
KVM_SET_IDENTITY_MAP_ADDR = _ioc(_IOC_WRITE, _KVMIO, 0x48, 8)
KVM_CREATE_IRQCHIP = _ioc(_IOC_NONE, _KVMIO, 0x60, 0)
KVM_CREATE_PIT2 = _ioc(_IOC_WRITE, _KVMIO, 0x77, _SIZEOF_KVM_PIT_CONFIG)
KVM_REGISTER_COALESCED_MMIO = _ioc(_IOC_WRITE, _KVMIO, 0x67, 16)  # kvm_coalesced_mmio_zone
KVM_RUN = _ioc(_IOC_NONE, _KVMIO, 0x80, 0)
KVM_GET_REGS = _ioc(_IOC_READ, _KVMIO, 0x81, _SIZEOF_KVM_REGS)
KVM_SET_REGS = _ioc(_IOC_WRITE, _KVMIO, 0x82, _SIZEOF_KVM_REGS)
KVM_GET_SREGS = _ioc(_IOC_READ, _KVMIO, 0x83, _SIZEOF_KVM_SREGS)
KVM_SET_SREGS = _ioc(_IOC_WRITE, _KVMIO, 0x84, _SIZEOF_KVM_SREGS)
KVM_GET_MSRS = _ioc(_RW, _KVMIO, 0x88, _SIZEOF_KVM_MSRS)
KVM_SET_MSRS = _ioc(_IOC_WRITE, _KVMIO, 0x89, _SIZEOF_KVM_MSRS)
KVM_SET_SIGNAL_MASK = _ioc(_IOC_WRITE, _KVMIO, 0x8B, _SIZEOF_KVM_SIGNAL_MASK)
KVM_SET_CPUID2 = _ioc(_IOC_WRITE, _KVMIO, 0x90, _SIZEOF_KVM_CPUID2)
KVM_ENABLE_CAP = _ioc(_IOC_WRITE, _KVMIO, 0xA3, _SIZEOF_KVM_ENABLE_CAP)
# The deep boot's: struct kvm_translation (24 bytes), kvm_fpu (416), kvm_lapic_state (1024).
KVM_TRANSLATE = _ioc(_RW, _KVMIO, 0x85, 24)
KVM_GET_MP_STATE = _ioc(_IOC_READ, _KVMIO, 0x98, 4)
KVM_SET_FPU = _ioc(_IOC_WRITE, _KVMIO, 0x8D, 416)
KVM_GET_LAPIC = _ioc(_IOC_READ, _KVMIO, 0x8E, 1024)
KVM_SET_LAPIC = _ioc(_IOC_WRITE, _KVMIO, 0x8F, 1024)
# arm64 (arch/arm64/include/uapi/asm/kvm.h): struct kvm_vcpu_init is 32 bytes,
# struct kvm_one_reg 16.
KVM_GET_ONE_REG = _ioc(_IOC_WRITE, _KVMIO, 0xAB, 16)
KVM_SET_ONE_REG = _ioc(_IOC_WRITE, _KVMIO, 0xAC, 16)
KVM_ARM_VCPU_INIT = _ioc(_IOC_WRITE, _KVMIO, 0xAE, 32)
KVM_ARM_PREFERRED_TARGET = _ioc(_IOC_READ, _KVMIO, 0xAF, 32)
# Core register ids: KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE |
# (offset in struct kvm_regs / 4).
ARM64_REG_X0 = 0x6030000000100000
ARM64_REG_PC = 0x6030000000100040

#: KVM_CAP_* numbers by name (include/uapi/linux/kvm.h), for the
#: capabilities the engines ask about and the deep boot's coalesced ring.
KVM_CAPS = {
    name: int(number)
    for name, number in (
        pair.split("=")
        for pair in (
            "IRQCHIP=0 USER_MEMORY=3 SET_TSS_ADDR=4 EXT_CPUID=7 NR_VCPUS=9 NR_MEMSLOTS=10 "
            "MP_STATE=14 DESTROY_MEMORY_REGION_WORKS=21 USER_NMI=22 IRQ_ROUTING=25 "
            "JOIN_MEMORY_REGIONS_WORKS=30 MCE=31 IRQFD=32 PIT2=33 PIT_STATE2=35 IOEVENTFD=36 "
            "SET_IDENTITY_MAP_ADDR=37 ADJUST_CLOCK=39 INTERNAL_ERROR_DATA=40 VCPU_EVENTS=41 "
            "DEBUGREGS=50 X86_ROBUST_SINGLESTEP=51 XSAVE=55 XCRS=56 TSC_CONTROL=60 "
            "GET_TSC_KHZ=61 MAX_VCPUS=66 ONE_REG=70 TSC_DEADLINE_TIMER=72 SIGNAL_MSI=77 "
            "DEVICE_CTRL=89 ARM_PSCI_0_2=102 SPLIT_IRQCHIP=121 IOEVENTFD_ANY_LENGTH=122 "
            "X2APIC_API=129 IMMEDIATE_EXIT=136 ARM_VM_IPA_SIZE=165 XSAVE2=208 "
            "COUNTER_OFFSET=227 COALESCED_MMIO=15 COALESCED_PIO=162"
        ).split()
    )
}
KVM_CAP_NAMES = {number: name for name, number in KVM_CAPS.items()}
# The limits every engine's verdict reports.
_LIMIT_CAPS = ("MAX_VCPUS", "NR_VCPUS", "NR_MEMSLOTS")

# struct kvm_run offsets (include/uapi/linux/kvm.h).
_RUN_EXIT_REASON = 8
_RUN_FAIL_ENTRY_REASON = 32  # fail_entry.hardware_entry_failure_reason, u64
_RUN_FAIL_ENTRY_CPU = 40  # fail_entry.cpu, u32
_RUN_INTERNAL_SUBERROR = 32  # internal.suberror, u32
_RUN_INTERNAL_NDATA = 36  # internal.ndata, u32
_RUN_INTERNAL_DATA = 40  # internal.data[16], u64
_RUN_EMULATION_INSN_SIZE = 48  # emulation_failure.insn_size, u8
_RUN_EMULATION_INSN_BYTES = 49  # emulation_failure.insn_bytes[15]
# kvm_run.mmio: phys_addr (u64), data[8], len (u32), is_write (u8).
_RUN_MMIO_ADDR, _RUN_MMIO_DATA, _RUN_MMIO_LEN, _RUN_MMIO_WRITE = 32, 40, 48, 52
# kvm_run.io: direction (u8), size (u8), port (u16), count (u32), data_offset (u64).
_RUN_IO_DIRECTION, _RUN_IO_SIZE, _RUN_IO_PORT, _RUN_IO_COUNT, _RUN_IO_OFFSET = 32, 33, 34, 36, 40
_SIZEOF_KVM_RUN_MIN = 2352
_RUN_HEAD = 288  # the bytes of kvm_run both backends copy out after a run
# KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: the failure carries them.
_EMULATION_FLAG_INSTRUCTION_BYTES = 1

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

#: KVM_EXIT_* names by number, from include/uapi/linux/kvm.h.
EXIT_REASONS = dict(
    enumerate(
        (
            "UNKNOWN EXCEPTION IO HYPERCALL DEBUG HLT MMIO IRQ_WINDOW_OPEN SHUTDOWN FAIL_ENTRY "
            "INTR SET_TPR TPR_ACCESS S390_SIEIC S390_RESET DCR NMI INTERNAL_ERROR OSI "
            "PAPR_HCALL S390_UCONTROL WATCHDOG S390_TSCH EPR SYSTEM_EVENT S390_STSI "
            "IOAPIC_EOI HYPERV ARM_NISV X86_RDMSR X86_WRMSR DIRTY_RING_FULL AP_RESET_HOLD "
            "X86_BUS_LOCK XEN RISCV_SBI RISCV_CSR NOTIFY"
        ).split()
    )
)
#: KVM_INTERNAL_ERROR_* suberrors (include/uapi/linux/kvm.h).
INTERNAL_SUBERRORS = {1: "EMULATION", 2: "SIMUL_EX", 3: "DELIVERY_EV", 4: "UNEXPECTED_EXIT_REASON"}

#: Each step of the check, as messages say it.  Every operation the backends
#: execute carries its step, so a failure is "step, errno" whatever the backend.
STEP_NAMES = (
    "open /dev/kvm",
    "read the KVM API version (KVM_GET_API_VERSION)",
    "create a VM (KVM_CREATE_VM)",
    "allocate guest memory (mmap)",
    "register guest memory (KVM_SET_USER_MEMORY_REGION)",
    "create a vCPU (KVM_CREATE_VCPU)",
    "read the CPUID KVM supports (KVM_GET_SUPPORTED_CPUID)",
    "give the vCPU that CPUID (KVM_SET_CPUID2)",
    "read special registers (KVM_GET_SREGS)",
    "write special registers (KVM_SET_SREGS)",
    "write registers (KVM_SET_REGS)",
    "read the run-area size (KVM_GET_VCPU_MMAP_SIZE)",
    "map the vCPU run area (mmap)",
    "set the MSRs a Linux boot needs (KVM_SET_MSRS)",
    "arm the run time limit (KVM_SET_SIGNAL_MASK, timer_create)",
    "run the vCPU (KVM_RUN)",
    "read registers (KVM_GET_REGS)",
    "read the preferred vCPU target (KVM_ARM_PREFERRED_TARGET)",
    "initialise the vCPU (KVM_ARM_VCPU_INIT)",
    "set PC (KVM_SET_ONE_REG)",
    "read X0 back (KVM_GET_ONE_REG)",
    "ask for the capabilities (KVM_CHECK_EXTENSION)",
    "set the identity-map address (KVM_SET_IDENTITY_MAP_ADDR)",
    "set the TSS address (KVM_SET_TSS_ADDR)",
    "create the in-kernel irqchip (KVM_CREATE_IRQCHIP)",
    "create the in-kernel PIT (KVM_CREATE_PIT2)",
    "enable the split irqchip (KVM_ENABLE_CAP(SPLIT_IRQCHIP))",
    "set the FPU state a Linux boot starts with (KVM_SET_FPU)",
    "read the local APIC (KVM_GET_LAPIC)",
    "wire the local APIC's LINT0 and LINT1 (KVM_SET_LAPIC)",
    "translate the guest's RIP to a physical address (KVM_TRANSLATE)",
    "done",
)
STEP_OPEN, STEP_API_VERSION, STEP_CREATE_VM, STEP_GUEST_MEMORY, STEP_MEMORY_REGION = range(0, 5)
STEP_CREATE_VCPU, STEP_GET_CPUID, STEP_SET_CPUID, STEP_GET_SREGS, STEP_SET_SREGS = range(5, 10)
STEP_SET_REGS, STEP_RUN_AREA_SIZE, STEP_MAP_RUN_AREA, STEP_SET_MSRS, STEP_ARM_TIMER = range(10, 15)
STEP_RUN, STEP_GET_REGS, STEP_ARM_TARGET, STEP_ARM_VCPU_INIT, STEP_SET_ONE_REG = range(15, 20)
STEP_GET_ONE_REG, STEP_CHECK_EXTENSION, STEP_SET_IDENTITY_MAP_ADDR = range(20, 23)
STEP_SET_TSS_ADDR, STEP_CREATE_IRQCHIP, STEP_CREATE_PIT2, STEP_SPLIT_IRQCHIP = range(23, 27)
STEP_SET_FPU, STEP_GET_LAPIC, STEP_SET_LAPIC, STEP_TRANSLATE = range(27, 31)
STEP_DONE = 31
assert STEP_DONE == len(STEP_NAMES) - 1

#: The guest puts this in EAX before HLT; reading it back proves it ran.
PROOF_VALUE = 0xB0C5117E
# Architectures with a smoke test: x86 (real and long mode) and arm64.
_SMOKE_MACHINES = frozenset({"x86_64", "amd64", "aarch64", "arm64"})
_ARCH_NAMES = {"amd64": "x86_64", "arm64": "aarch64"}


def _engine(
    x86_64: str,
    aarch64: str,
    ioctls: str,
    boot: str,
    optional_x86_64: str = "",
    optional_aarch64: str = "",
    **devices: str,
) -> dict[str, Any]:
    """One row of ENGINE_REQUIREMENTS from its space-separated lists."""
    return {
        "required": {"x86_64": tuple(x86_64.split()), "aarch64": tuple(aarch64.split())},
        "optional": {
            arch: tuple(names.split())
            for arch, names in (("x86_64", optional_x86_64), ("aarch64", optional_aarch64))
            if names
        },
        "ioctls": tuple(ioctls.split()),
        "devices": {purpose.replace("_", "-"): node for purpose, node in devices.items()},
        "boot": boot,
    }


# The engines whose start-up needs the gate checks.  BoxLite runs libkrun;
# None is the bare device check (open, API version, VM, trivial guest).
DEFAULT_ENGINE = "libkrun"

#: What each engine needs from KVM to start, by architecture: capabilities it
#: refuses to start without, capabilities it uses when present, the VM ioctls
#: it issues at start-up, device nodes by purpose, and the boot it does.
#: Each row cites the engine's source (snapshots of 2026, read for this table).
ENGINE_REQUIREMENTS: dict[str, dict[str, Any]] = {
    # libkrun src/vmm/src/linux/vstate.rs: KvmContext::new() (capabilities,
    # first missing one reported by name), Vm::new() (TSS, irqchip, PIT2,
    # supported CPUID, MSR list).  BoxLite's fork has the same lists.
    "libkrun": _engine(
        x86_64="IRQCHIP IOEVENTFD IRQFD USER_MEMORY SET_TSS_ADDR",
        aarch64="IRQCHIP IOEVENTFD IRQFD USER_MEMORY ARM_PSCI_0_2",
        optional_x86_64="SPLIT_IRQCHIP",
        ioctls="KVM_SET_TSS_ADDR KVM_CREATE_IRQCHIP KVM_CREATE_PIT2",
        boot="direct 64-bit",
    ),
    # firecracker src/vmm/src/arch/x86_64/kvm.rs and arch/aarch64/kvm.rs
    # DEFAULT_CAPABILITIES; src/vmm/src/vstate/kvm.rs ("Missing KVM
    # capabilities: {0:#x?}"); src/vmm/src/arch/x86_64/vm.rs (TSS, irqchip, PIT2).
    "firecracker": _engine(
        x86_64="IRQCHIP IOEVENTFD IRQFD USER_MEMORY SET_TSS_ADDR PIT2 PIT_STATE2 ADJUST_CLOCK "
        "DEBUGREGS MP_STATE VCPU_EVENTS XCRS XSAVE EXT_CPUID",
        aarch64="IOEVENTFD IRQFD USER_MEMORY ARM_PSCI_0_2 DEVICE_CTRL MP_STATE ONE_REG",
        optional_x86_64="TSC_CONTROL GET_TSC_KHZ XSAVE2",
        optional_aarch64="COUNTER_OFFSET",
        ioctls="KVM_SET_TSS_ADDR KVM_CREATE_IRQCHIP KVM_CREATE_PIT2",
        boot="direct 64-bit",
        networking="/dev/net/tun",
    ),
    # cloud-hypervisor hypervisor/src/kvm/x86_64/mod.rs and aarch64/mod.rs
    # check_required_kvm_extensions(); hypervisor/src/kvm/mod.rs (identity
    # map, TSS and split irqchip set with unwrap: a failure is a panic).
    "cloud-hypervisor": _engine(
        x86_64="ADJUST_CLOCK EXT_CPUID GET_TSC_KHZ IMMEDIATE_EXIT IOEVENTFD IRQCHIP IRQFD "
        "IRQ_ROUTING MP_STATE SET_IDENTITY_MAP_ADDR SET_TSS_ADDR SPLIT_IRQCHIP "
        "TSC_DEADLINE_TIMER USER_MEMORY USER_NMI VCPU_EVENTS XSAVE",
        aarch64="IMMEDIATE_EXIT IOEVENTFD IRQCHIP IRQFD IRQ_ROUTING MP_STATE ONE_REG USER_MEMORY",
        optional_x86_64="XCRS X2APIC_API XSAVE2",
        optional_aarch64="ARM_VM_IPA_SIZE",
        ioctls="KVM_SET_IDENTITY_MAP_ADDR KVM_SET_TSS_ADDR KVM_ENABLE_CAP(SPLIT_IRQCHIP)",
        boot="direct 64-bit",
        networking="/dev/net/tun",
    ),
    # QEMU accel/kvm/kvm-all.c kvm_required_capabilites (9.x/10.x) and
    # target/i386/kvm/kvm.c kvm_arch_required_capabilities; IRQFD, PIT2 and
    # PIT_STATE2 with its default in-kernel irqchip and PIT.
    "qemu": _engine(
        x86_64="USER_MEMORY DESTROY_MEMORY_REGION_WORKS JOIN_MEMORY_REGIONS_WORKS "
        "INTERNAL_ERROR_DATA IOEVENTFD IOEVENTFD_ANY_LENGTH SET_TSS_ADDR EXT_CPUID MP_STATE "
        "SIGNAL_MSI IRQ_ROUTING DEBUGREGS XSAVE VCPU_EVENTS X86_ROBUST_SINGLESTEP MCE "
        "ADJUST_CLOCK SET_IDENTITY_MAP_ADDR IRQFD PIT2 PIT_STATE2",
        aarch64="USER_MEMORY DESTROY_MEMORY_REGION_WORKS JOIN_MEMORY_REGIONS_WORKS "
        "INTERNAL_ERROR_DATA IOEVENTFD IOEVENTFD_ANY_LENGTH",
        optional_x86_64="XSAVE2",
        ioctls="KVM_SET_IDENTITY_MAP_ADDR KVM_SET_TSS_ADDR KVM_CREATE_IRQCHIP KVM_CREATE_PIT2",
        boot="firmware (real mode)",
        networking="/dev/net/tun",
        vhost_net="/dev/vhost-net",
        vhost_vsock="/dev/vhost-vsock",
    ),
    # crosvm src/crosvm/sys/linux.rs ("missing required hypervisor
    # capability ImmediateExit"); hypervisor/src/kvm/mod.rs.  Its irqchip
    # is the kernel's unless --split-irqchip: KvmKernelIrqChip::new
    # (devices/src/irqchip/kvm/x86_64.rs) makes the irqchip, then the PIT.
    "crosvm": _engine(
        x86_64="IMMEDIATE_EXIT",
        aarch64="IMMEDIATE_EXIT",
        optional_x86_64="XCRS TSC_DEADLINE_TIMER",
        ioctls="KVM_SET_IDENTITY_MAP_ADDR KVM_SET_TSS_ADDR KVM_CREATE_IRQCHIP KVM_CREATE_PIT2",
        boot="direct 64-bit",
        networking="/dev/net/tun",
    ),
}
#: The engines whose start-up the gate can check.  None is the bare device check.
ENGINES = tuple(ENGINE_REQUIREMENTS)
# The start-up ioctls the table names, with their steps, in the order engines
# issue them.  Each runs on a throwaway VM (see _probe_startup_ioctls).
_STARTUP_STEPS = {
    "KVM_SET_IDENTITY_MAP_ADDR": STEP_SET_IDENTITY_MAP_ADDR,
    "KVM_SET_TSS_ADDR": STEP_SET_TSS_ADDR,
    "KVM_CREATE_IRQCHIP": STEP_CREATE_IRQCHIP,
    "KVM_CREATE_PIT2": STEP_CREATE_PIT2,
    "KVM_ENABLE_CAP(SPLIT_IRQCHIP)": STEP_SPLIT_IRQCHIP,
}
# The addresses QEMU and the rust-vmm engines use, below 4 GiB.
_IDENTITY_MAP_ADDR, _TSS_ADDR = 0xFFFBC000, 0xFFFBD000

# x86 control-register and EFER bits (arch/x86/include/uapi/asm/processor-flags.h,
# arch/x86/include/asm/msr-index.h).
_CR0_PE, _CR0_MP, _CR0_ET, _CR0_NE = 1 << 0, 1 << 1, 1 << 4, 1 << 5
_CR0_WP, _CR0_AM, _CR0_PG = 1 << 16, 1 << 18, 1 << 31
_CR4_PAE = 1 << 5
_CR4_OSXSAVE = 1 << 18
_EFER_LME, _EFER_LMA = 1 << 8, 1 << 10
# The CR0 that Linux's startup_64 loads (arch/x86/include/asm/processor-flags.h
# CR0_STATE): protected mode, paging, and the FPU/alignment bits it wants.
_CR0_LINUX = _CR0_PE | _CR0_MP | _CR0_ET | _CR0_NE | _CR0_WP | _CR0_AM | _CR0_PG
# Page-table entry bits (arch/x86/include/asm/pgtable_types.h).
_PAGE_PRESENT, _PAGE_RW, _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_PSE = 0x1, 0x2, 0x20, 0x40, 0x80
_KERNPG_TABLE = _PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED | _PAGE_DIRTY  # 0x63
_PAGE_KERNEL_LARGE = _KERNPG_TABLE | _PAGE_PSE  # 0xe3, without _PAGE_GLOBAL
# GDT descriptor flags as Linux writes them (GDT_ENTRY_INIT in asm/segment.h;
# DESC_CODE64 0xa09b, DESC_DATA64 0xc093): present, DPL 0, accessed, and L
# (code) or D/B (data), 4 KiB granularity.  VM entry wants the accessed bit.
_GDT_CODE64 = 0xA09B
_GDT_DATA64 = 0xC093
# The 64-bit boot protocol's selectors (Documentation/arch/x86/boot.rst):
# __BOOT_CS 0x10 and __BOOT_DS 0x18, GDT entries 2 and 3.
_BOOT_CS, _BOOT_DS = 0x10, 0x18

#: CPUID features the long-mode guest and the MSR step depend on: (leaf,
#: register, bit) from arch/x86/include/asm/cpufeatures.h.
CPUID_FEATURES = {
    "cx16": (1, "ecx", 13),
    "xsave": (1, "ecx", 26),
    "arch_capabilities": (7, "edx", 29),
}
# MSRs (arch/x86/include/asm/msr-index.h).
MSR_IA32_TSC = 0x10
MSR_IA32_ARCH_CAPABILITIES = 0x10A
MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
#: The MSRs Firecracker, libkrun and cloud-hypervisor write before a Linux
#: boot (Firecracker src/vmm/src/arch/x86_64/msr.rs create_boot_msr_entries;
#: libkrun src/arch/src/x86_64/regs.rs), with the values they write.
BOOT_MSRS = (
    ("IA32_SYSENTER_CS", MSR_IA32_SYSENTER_CS, 0),
    ("IA32_SYSENTER_ESP", MSR_IA32_SYSENTER_ESP, 0),
    ("IA32_SYSENTER_EIP", MSR_IA32_SYSENTER_EIP, 0),
    ("STAR", MSR_STAR, 0),
    ("CSTAR", MSR_CSTAR, 0),
    ("KERNEL_GS_BASE", MSR_KERNEL_GS_BASE, 0),
    ("SYSCALL_MASK", MSR_SYSCALL_MASK, 0),
    ("LSTAR", MSR_LSTAR, 0),
    ("IA32_TSC", MSR_IA32_TSC, 0),
    ("IA32_MISC_ENABLE", MSR_IA32_MISC_ENABLE, 1),  # fast strings
)

# Guest speed: a guest that runs this many times slower than the same loop on
# the host CPU is emulated.  Hardware runs it at about 1x, a KVM nested in an
# emulator at 0.5-3x, an instruction emulator at thousands
# (../shared/research/real-guests.md has the measurements).
EMULATION_RATIO = 50.0
# A guest loop measured more than this many times faster than the same loop on
# the host CPU is a broken measurement (noise in the 1-iteration run), never
# hardware speed: it is measured again, and never counted as a pass.
_IMPLAUSIBLE_RATIO = 0.1
# Loop sizes: a longer run only when the shorter one's loop time is still
# within the noise of KVM_RUN's entry and exit.  Each sample after the first
# doubles its short run (_measure_speed).
_SPEED_SHORT = 1024
_SPEED_LONG = 1 << 17
_SPEED_SLOW_NS = 200_000  # loop time that already measures well
# An emulated verdict needs two samples within this factor of each other,
# out of this many at most (_measure_speed).
_SPEED_AGREE = 1.5
_SPEED_TRIES = 5

# Raw syscalls of the Python backend (the native side uses the same):
# timer_create, timer_settime, timer_delete, rt_tgsigqueueinfo.  glibc before
# 2.34 keeps the timer calls in librt, which a Python process may not have
# loaded.  Keyed by the interpreter's ABI, not the kernel's machine: a 32-bit
# Python on a 64-bit kernel uses the 32-bit numbers.
# arch/x86/entry/syscalls/syscall_{64,32}.tbl, include/uapi/asm-generic/unistd.h,
# arch/arm/tools/syscall.tbl.
_SYSCALLS = {
    "x86_64": (222, 223, 226, 297),
    "i386": (259, 260, 263, 335),
    "aarch64": (107, 110, 111, 240),
    "arm": (257, 258, 261, 363),
}
_CLOCK_MONOTONIC = 1
_TIMER_ABSTIME = 1
_SIGEV_THREAD_ID = 4
_SI_USER, _SI_TIMER = 0, -2
# How a run was bounded (kvm_smoke.c BOUND_*).
BOUND_TIMER, BOUND_WATCHDOG, BOUND_NONE = 1, 2, 3
BOUND_NAMES = {0: None, BOUND_TIMER: "timer", BOUND_WATCHDOG: "watchdog thread", BOUND_NONE: "none"}
_STASH = 8  # foreign signals of our number set aside during one run
# EINTR on an ioctl other than KVM_RUN is retried for this long at most: a
# policy that answers EINTR forever must not hang the check, and a caller's
# fast interval timer must not fail it.
_EINTR_RETRY_NS = 200_000_000
# mmap(2) and mprotect(2) flags (include/uapi/asm-generic/mman-common.h).
_PROT_READ, _PROT_WRITE, _PROT_EXEC = 0x1, 0x2, 0x4
_MAP_SHARED, _MAP_PRIVATE, _MAP_ANONYMOUS = 0x01, 0x02, 0x20

# Hypervisor.framework return codes (hv_error.h): err_common_hypervisor is
# err_system(0x3e) | err_sub(0xba5) = 0xfae94000; hv_return_t is a signed
# 32-bit mach_error_t, compared here as unsigned.
HV_SUCCESS = 0
HV_ERROR = 0xFAE94001
HV_BUSY = 0xFAE94002
HV_BAD_ARGUMENT = 0xFAE94003
HV_ILLEGAL_GUEST_STATE = 0xFAE94004
HV_NO_RESOURCES = 0xFAE94005
HV_NO_DEVICE = 0xFAE94006
HV_DENIED = 0xFAE94007
HV_UNSUPPORTED = 0xFAE9400F
HV_RETURN_NAMES = {
    HV_SUCCESS: "HV_SUCCESS",
    HV_ERROR: "HV_ERROR",
    HV_BUSY: "HV_BUSY",
    HV_BAD_ARGUMENT: "HV_BAD_ARGUMENT",
    HV_ILLEGAL_GUEST_STATE: "HV_ILLEGAL_GUEST_STATE",
    HV_NO_RESOURCES: "HV_NO_RESOURCES",
    HV_NO_DEVICE: "HV_NO_DEVICE",
    HV_DENIED: "HV_DENIED",
    HV_UNSUPPORTED: "HV_UNSUPPORTED",
}
_HVF_PATH = "/System/Library/Frameworks/Hypervisor.framework/Hypervisor"
_SECURITY_PATH = "/System/Library/Frameworks/Security.framework/Security"
_COREFOUNDATION_PATH = "/System/Library/Frameworks/CoreFoundation.framework/CoreFoundation"
HV_ENTITLEMENT = "com.apple.security.hypervisor"
# libSystem holds sysctlbyname; since macOS 11 it lives in the dyld shared
# cache, and dlopen() by this absolute path still finds it there.
_LIBSYSTEM_PATH = "/usr/lib/libSystem.B.dylib"
#: The sysctls the macOS check reads.
MACOS_SYSCTLS = (
    "kern.hv_support",
    "kern.hv_vmm_present",
    "kern.hv.max_address_spaces",
    "sysctl.proc_translated",
)

_WSL_INTEROP = "/proc/sys/fs/binfmt_misc/WSLInterop"
_OVERFLOW_ID = 65534  # what an unmapped uid or gid shows as inside a user namespace
_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture
_LANDLOCK_CREATE_RULESET_VERSION = 1

#: How a deep boot (the engine's own kernel) ended.
BOOTED = "booted"
BOOT_STOPPED = "stopped"
BOOT_TIMED_OUT = "timed-out"
BOOT_PANICKED = "panicked"
BOOT_RESET = "reset"
BOOT_CALL_FAILED = "call-failed"
BOOT_NOT_RUN = "not-run"
BOOT_OUTCOMES = (BOOTED, BOOT_STOPPED, BOOT_TIMED_OUT, BOOT_PANICKED, BOOT_RESET, BOOT_CALL_FAILED)
_MIB = 1 << 20


# ── Errors ──────────────────────────────────────────────────────────────────


class BoxliteError(RuntimeError):
    """Base of every error; ``str()`` reads like BoxLite's display of it.

    ``detail`` is the text after the variant's prefix: for errors the checks
    raise, the summary, what was tried and answered, the evidence and the
    fix; ``summary`` is its first line.  They also carry ``cause`` (a stable
    identifier such as ``"kvm-not-in-group"``), ``evidence`` (what was seen)
    and ``fix``.  ``code`` is the BoxLite SDK's code for the class
    ("unsupported", "engine_unavailable", ...), None where the SDK has none.
    """

    prefix = ""
    code: str | None = None
    # The finding whose failure it is, for errors the rules name.
    _layer: str | None = None

    def __init__(
        self,
        detail: str = "",
        *,
        cause: str = "",
        evidence: Mapping[str, object] | None = None,
        fix: str = "",
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.cause = cause
        self.evidence: dict[str, object] = dict(evidence or {})
        self.fix = fix

    def __str__(self) -> str:
        return self.prefix + self.detail

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.summary!r}, cause={self.cause!r})"

    @property
    def summary(self) -> str:
        """The first line of ``detail``."""
        return self.detail.split("\n", 1)[0]


class UnsupportedEngineError(BoxliteError):
    """BoxLite's UnsupportedEngine: the engine kind is not supported."""

    prefix = "unsupported engine kind"

    def __str__(self) -> str:
        return self.prefix


class EngineError(BoxliteError):
    """BoxLite's Engine variant."""

    prefix, code = "engine reported an error: ", "engine_unavailable"


class ConfigError(BoxliteError):
    """BoxLite's Config variant."""

    prefix, code = "configuration error: ", "config_error"


class StorageError(BoxliteError):
    """BoxLite's Storage variant."""

    prefix, code = "storage error: ", "storage_error"


class ImageError(BoxliteError):
    """BoxLite's Image variant."""

    prefix, code = "images error: ", "image_pull_failed"


class PortalError(BoxliteError):
    """BoxLite's Portal variant."""

    prefix = "portal error: "


class NetworkError(BoxliteError):
    """BoxLite's Network variant."""

    prefix, code = "network error: ", "network_unavailable"


class RpcError(BoxliteError):
    """BoxLite's Rpc variant."""

    prefix = "gRPC/tonic error: "


class RpcTransportError(BoxliteError):
    """BoxLite's RpcTransport variant."""

    prefix = "gRPC transport error: "


class InternalError(BoxliteError):
    """BoxLite's Internal variant: the checker itself failed."""

    prefix, code = "internal error: ", "internal"


class ExecutionError(BoxliteError):
    """BoxLite's Execution variant."""

    prefix, code = "Execution error: ", "execution_failed"


class UnsupportedError(BoxliteError):
    """BoxLite's Unsupported variant: this host cannot run BoxLite's VMs."""

    prefix, code = "unsupported: ", "unsupported"


class NotFoundError(BoxliteError):
    """BoxLite's NotFound variant."""

    prefix, code = "box not found: ", "not_found"


class AlreadyExistsError(BoxliteError):
    """BoxLite's AlreadyExists variant."""

    prefix, code = "already exists: ", "already_exists"


class InvalidStateError(BoxliteError):
    """BoxLite's InvalidState variant."""

    prefix, code = "invalid state: ", "invalid_state"


class DatabaseError(BoxliteError):
    """BoxLite's Database variant."""

    prefix, code = "database error: ", "database_error"


class MetadataError(BoxliteError):
    """BoxLite's MetadataError variant."""

    prefix, code = "metadata error: ", "metadata_error"


class InvalidArgumentError(BoxliteError):
    """BoxLite's InvalidArgument variant."""

    prefix, code = "invalid argument: ", "invalid_argument"


class StoppedError(BoxliteError):
    """BoxLite's Stopped variant."""

    prefix, code = "stopped: ", "stopped"


class ResourceExhaustedError(BoxliteError):
    """BoxLite's ResourceExhausted variant: a limit, not a missing feature."""

    prefix, code = "resource exhausted: ", "resource_exhausted"


def _log(level: str, message: str, *args: object) -> None:
    """Log on the "boxlite_syscheck" logger, importing logging only now."""
    import logging  # costs milliseconds; only error paths log

    getattr(logging.getLogger("boxlite_syscheck"), level)(message, *args)


def errno_name(number: int) -> str:
    """Return "ENAME (text)" for an errno, or "errno N (text)" without a name."""
    name = errno.errorcode.get(number, f"errno {number}")
    return f"{name} ({os.strerror(number)})"


def exit_name(reason: int) -> str:
    """Return "KVM_EXIT_NAME (n)" for an exit reason."""
    return f"KVM_EXIT_{EXIT_REASONS.get(reason, 'UNLISTED')} ({reason})"


def _errno_of(err: OSError) -> int:
    """The errno of an OS call that failed.

    An OSError without an errno is not the OS's answer: a caller's signal
    handler raised it (a TimeoutError, say) while we waited in the call, and
    it goes back to the caller unchanged.
    """
    if err.errno is None:
        raise err
    return err.errno


# ── OS seams: every operating-system access goes through these ─────────────


def _open_device(path: str) -> io.FileIO:
    """Open a device read-write and close-on-exec; raise OSError.

    The file object owns the descriptor from the moment the C call returns:
    an exception a caller's signal handler raises right after cannot leak it.
    """
    return io.FileIO(path, "r+")


def _stat(path: str) -> os.stat_result:
    """Stat a path as open() would see it; raise OSError."""
    return os.stat(path)


def _read_text(path: str, limit: int = 1 << 16) -> str | None:
    """A text file's first ``limit`` bytes, or None when it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(limit)
    except OSError as err:
        _errno_of(err)
        return None


def _exists(path: str) -> bool:
    """Whether a path exists (marker files, /sys entries)."""
    try:
        os.stat(path)
    except OSError as err:
        _errno_of(err)
        return False
    return True


def _getxattr(path: str, name: str) -> bytes | None:
    """An extended attribute's value, or None."""
    try:
        return os.getxattr(path, name)
    except OSError as err:
        _errno_of(err)
        return None


def _load_library(path: str) -> ctypes.CDLL:
    """Load a shared library by absolute path; raise OSError."""
    import ctypes

    if not os.path.isabs(path):
        raise OSError(errno.EINVAL, "native code is loaded by absolute path only", path)
    return ctypes.CDLL(path, use_errno=True)


def _libc() -> ctypes.CDLL:
    """The C library already in this process (dlopen(NULL), no search)."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _user_name(uid: int) -> str | None:
    """The user database's name for a uid, or None (none, or unreadable)."""
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return None


def _group_entry(gid: int) -> tuple[str, list[str]] | None:
    """The group database's (name, members) for a gid, or None."""
    try:
        import grp

        entry = grp.getgrgid(gid)
    except (KeyError, ImportError):
        return None
    return entry.gr_name, list(entry.gr_mem)


def _group_named(name: str) -> bool | None:
    """Whether the group database has a group of this name (None: unreadable)."""
    try:
        import grp

        grp.getgrnam(name)
    except KeyError:
        return False
    except ImportError:
        return None
    return True


def _sysctl_int(name: str) -> int | None:
    """Read an integer sysctl on macOS; None when it does not exist."""
    import ctypes

    try:
        libc = _cached("libsystem", lambda: _load_library(_LIBSYSTEM_PATH))
    except OSError as err:  # no libSystem: not macOS, or a broken one
        raise OSError(errno.ENOENT, f"{_LIBSYSTEM_PATH}: {err}") from err
    fn = libc.sysctlbyname
    fn.argtypes = [
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_void_p,
        ctypes.c_size_t,
    ]
    fn.restype = ctypes.c_int
    value = ctypes.c_int64(0)
    size = ctypes.c_size_t(ctypes.sizeof(value))
    if fn(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
        number = ctypes.get_errno()
        if number == errno.ENOENT:
            return None
        raise OSError(number, os.strerror(number), name)
    # Sysctls are 4 or 8 bytes; a 4-byte one filled only the low half.
    if size.value == 4:
        return int(ctypes.c_int32(value.value & 0xFFFFFFFF).value)
    return int(value.value)


def _hvf() -> ctypes.CDLL:
    """Load Hypervisor.framework by absolute path, declaring what we call."""
    import ctypes

    def load() -> ctypes.CDLL:
        lib = _load_library(_HVF_PATH)
        # hv_return_t hv_vm_create(hv_vm_config_t config); NULL is the default.
        lib.hv_vm_create.argtypes = [ctypes.c_void_p]
        lib.hv_vm_create.restype = ctypes.c_int32
        # hv_return_t hv_vm_destroy(void);
        lib.hv_vm_destroy.argtypes = []
        lib.hv_vm_destroy.restype = ctypes.c_int32
        return lib

    lib: ctypes.CDLL = _cached("hvf", load)
    return lib


def _hv_vm_create() -> int:
    """Call hv_vm_create(NULL); return the code as an unsigned 32-bit int."""
    return int(_hvf().hv_vm_create(None)) & 0xFFFFFFFF


def _hv_vm_destroy() -> int:
    """Call hv_vm_destroy(); return the code as an unsigned 32-bit int."""
    return int(_hvf().hv_vm_destroy()) & 0xFFFFFFFF


def _hv_entitlement() -> bool | None:
    """Whether this process holds com.apple.security.hypervisor (None: unknown).

    SecTaskCreateFromSelf and SecTaskCopyValueForEntitlement from
    Security.framework, with CoreFoundation for the string and the boolean.
    """
    import ctypes

    try:
        security = _cached("security", lambda: _load_library(_SECURITY_PATH))
        cf = _cached("corefoundation", lambda: _load_library(_COREFOUNDATION_PATH))
    except OSError:
        return None
    vp = ctypes.c_void_p
    security.SecTaskCreateFromSelf.argtypes = [vp]
    security.SecTaskCreateFromSelf.restype = vp
    security.SecTaskCopyValueForEntitlement.argtypes = [vp, vp, vp]
    security.SecTaskCopyValueForEntitlement.restype = vp
    cf.CFStringCreateWithCString.argtypes = [vp, ctypes.c_char_p, ctypes.c_uint32]
    cf.CFStringCreateWithCString.restype = vp
    cf.CFRelease.argtypes = [vp]
    cf.CFRelease.restype = None
    cf.CFGetTypeID.argtypes = [vp]
    cf.CFGetTypeID.restype = ctypes.c_ulong
    cf.CFBooleanGetTypeID.argtypes = []
    cf.CFBooleanGetTypeID.restype = ctypes.c_ulong
    cf.CFBooleanGetValue.argtypes = [vp]
    cf.CFBooleanGetValue.restype = ctypes.c_bool
    task = security.SecTaskCreateFromSelf(None)
    if not task:
        return None
    key = cf.CFStringCreateWithCString(None, HV_ENTITLEMENT.encode(), 0x08000100)  # UTF-8
    try:
        value = security.SecTaskCopyValueForEntitlement(task, key, None)
        if not value:
            return False
        try:
            is_bool = cf.CFGetTypeID(value) == cf.CFBooleanGetTypeID()
            return bool(is_bool and cf.CFBooleanGetValue(value))
        finally:
            cf.CFRelease(value)
    finally:
        if key:
            cf.CFRelease(key)
        cf.CFRelease(task)


_CACHE: dict[str, Any] = {}
# First use may come from many threads at once: each value is made once,
# under this lock (re-entrant: making one value may need another).
_CACHE_LOCK = _thread.RLock()


def _cached(key: str, make: Callable[[], Any]) -> Any:
    """Return a per-process cached value, making it once on first use."""
    try:
        return _CACHE[key]
    except KeyError:
        pass
    with _CACHE_LOCK:
        try:
            return _CACHE[key]
        except KeyError:
            value = _CACHE[key] = make()
            return value


def _cached_in(table: str, key: Hashable, make: Callable[..., Any], *args: Any) -> Any:
    """``make(*args)``, kept under ``key`` in the cache's dict ``table``: for
    values kept by what they are made of (a tuple of names, say), with no
    key string to build and hash on each call.  Made without the lock: two
    threads may both make one, and both get the one kept, so only a value
    that is the same whoever makes it belongs here."""
    kept: dict[Hashable, Any] = _cached(table, dict)
    value = kept.get(key)
    if value is None:
        value = kept.setdefault(key, make(*args))
    return value


def _reset_caches() -> None:
    """Forget loaded libraries and cached lookups (for tests)."""
    _CACHE.clear()


# ── Kernel structures (ctypes, defined on first use) ────────────────────────

_MAX_CPUID_ENTRIES = 256  # more than any KVM reports today (E2BIG otherwise)
_MAX_MSR_INDICES = 1024
# Operation arrays (kvm_smoke.c has the same numbers).
_FD_SLOTS, _VALUE_SLOTS = 5, 27


class _Abi:
    """ctypes mirrors of the kernel and libkvmsmoke structures.

    Built on first use so that importing this module does not import ctypes;
    the structures of the long-mode guest's CPUID and MSRs and of the Python
    backend's signals are built when first asked for (each structure class
    costs tens of microseconds to make, and a bare check needs neither).
    """

    def __init__(self) -> None:
        import ctypes

        u8, u16, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint64
        u32, i32, i64 = ctypes.c_uint32, ctypes.c_int32, ctypes.c_int64

        class KvmRegs(ctypes.Structure):
            # arch/x86/include/uapi/asm/kvm.h struct kvm_regs
            _fields_ = _fields(
                "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags", u64
            )

        class KvmSegment(ctypes.Structure):
            # arch/x86/include/uapi/asm/kvm.h struct kvm_segment
            _fields_ = [("base", u64), ("limit", u32), ("selector", u16)]
            _fields_ += _fields("type present dpl db s l g avl unusable padding", u8)

        class KvmDtable(ctypes.Structure):
            _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]

        class KvmSregs(ctypes.Structure):
            _fields_ = _fields("cs ds es fs gs ss tr ldt", KvmSegment)
            _fields_ += [("gdt", KvmDtable), ("idt", KvmDtable)]
            _fields_ += _fields("cr0 cr2 cr3 cr4 cr8 efer apic_base", u64)
            _fields_ += [("interrupt_bitmap", u64 * 4)]

        class KvmUserspaceMemoryRegion(ctypes.Structure):
            _fields_ = [("slot", u32), ("flags", u32)]
            _fields_ += _fields("guest_phys_addr memory_size userspace_addr", u64)

        class Op(ctypes.Structure):
            # struct kvmsmoke_op in kvm_smoke.c
            _fields_ = _fields("step kind fd fd_out value_out check flags pad", i32)
            _fields_ += [("check_value", i64)]
            _fields_ += _fields("request arg src len", u64)

        class State(ctypes.Structure):
            # struct kvmsmoke_state
            _fields_ = [("fds", i32 * _FD_SLOTS)]
            _fields_ += _fields("run_addr run_size deadline_ns", u64)

        class Outcome(ctypes.Structure):
            # struct kvmsmoke_result
            _fields_ = _fields(
                "step error op_index timed_out runs interrupted bound bound_error requeued stopped",
                i32,
            )
            _fields_ += [("values", i64 * _VALUE_SLOTS), ("run_head", u8 * _RUN_HEAD)]

        self.KvmRegs = KvmRegs
        self.KvmSegment = KvmSegment
        self.KvmSregs = KvmSregs
        self.KvmUserspaceMemoryRegion = KvmUserspaceMemoryRegion
        self.Op = Op
        self.State = State
        self.Outcome = Outcome

    def __getattr__(self, name: str) -> Any:
        make = _ABI_LATER.get(name)
        if make is None:
            raise AttributeError(name)
        with _CACHE_LOCK:  # made once: two threads must not get two classes
            if name not in self.__dict__:
                self.__dict__.update(make())
        return self.__dict__[name]


def _fields(names: str, kind: Any) -> list[tuple[str, Any]]:
    return [(name, kind) for name in names.split()]


def _cpuid_msr_structures() -> dict[str, Any]:
    """The long-mode guest's CPUID and MSR structures (x86 kvm.h)."""
    import ctypes

    u32, u64 = ctypes.c_uint32, ctypes.c_uint64

    class KvmCpuidEntry2(ctypes.Structure):
        _fields_ = _fields("function index flags eax ebx ecx edx", u32)
        _fields_ += [("padding", u32 * 3)]

    class KvmCpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32)]
        _fields_ += [("entries", KvmCpuidEntry2 * _MAX_CPUID_ENTRIES)]

    class KvmMsrList(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("indices", u32 * _MAX_MSR_INDICES)]

    class KvmMsrEntry(ctypes.Structure):
        _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]

    class KvmMsrs(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * len(BOOT_MSRS))]

    return {"KvmCpuid2": KvmCpuid2, "KvmMsrList": KvmMsrList, "KvmMsrs": KvmMsrs}


def _signal_structures() -> dict[str, Any]:
    """The structures of the Python backend's bound (signals and timers)."""
    import ctypes

    class SigEvent(ctypes.Structure):
        # include/uapi/asm-generic/siginfo.h struct sigevent, 64 bytes,
        # with the SIGEV_THREAD_ID member of its union.
        _fields_ = [("sigev_value", ctypes.c_void_p)]
        _fields_ += _fields("sigev_signo sigev_notify tid", ctypes.c_int)
        _fields_ += [("pad", ctypes.c_int * 11)]

    class SigInfo(ctypes.Structure):
        # siginfo_t, 128 bytes: the fields read here sit at the same
        # offsets for SI_TIMER (_timer) and SI_USER/SI_QUEUE (_rt).
        _fields_ = _fields("si_signo si_errno si_code pad0 si_pid", ctypes.c_int)
        _fields_ += [("si_uid", ctypes.c_uint), ("si_value", ctypes.c_void_p)]
        _fields_ += [("rest", ctypes.c_uint8 * (128 - 24 - ctypes.sizeof(ctypes.c_void_p)))]

    class SigSet(ctypes.Structure):
        _fields_ = [("bits", ctypes.c_ulong * (128 // ctypes.sizeof(ctypes.c_ulong)))]

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    class Itimerspec(ctypes.Structure):
        _fields_ = [("it_interval", Timespec), ("it_value", Timespec)]

    return {
        "SigEvent": SigEvent,
        "SigInfo": SigInfo,
        "SigSet": SigSet,
        "Timespec": Timespec,
        "Itimerspec": Itimerspec,
    }


#: The structures _Abi makes when first asked for, by the group that makes them.
_ABI_LATER: dict[str, Callable[[], dict[str, Any]]] = {
    **dict.fromkeys(("KvmCpuid2", "KvmMsrList", "KvmMsrs"), _cpuid_msr_structures),
    **dict.fromkeys(
        ("SigEvent", "SigInfo", "SigSet", "Timespec", "Itimerspec"), _signal_structures
    ),
}


def _abi() -> _Abi:
    abi: _Abi = _cached("abi", _Abi)
    return abi


# ── Guests: defined once, as data ───────────────────────────────────────────


def _gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode a GDT descriptor as the kernel's GDT_ENTRY_INIT does."""
    return (
        ((base & 0xFF000000) << (56 - 24))
        | ((flags & 0x0000F0FF) << 40)
        | ((limit & 0x000F0000) << (48 - 16))
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
    )


def _segment(selector: int, descriptor: int) -> dict[str, int]:
    """The struct kvm_segment fields that loading ``descriptor`` gives."""
    limit = (descriptor & 0xFFFF) | ((descriptor >> 32) & 0xF0000)
    granular = (descriptor >> 55) & 1
    return {
        "base": ((descriptor >> 16) & 0xFFFFFF) | ((descriptor >> 32) & 0xFF000000),
        "limit": (limit << 12) | 0xFFF if granular else limit,
        "selector": selector,
        "type": (descriptor >> 40) & 0xF,
        "s": (descriptor >> 44) & 1,
        "dpl": (descriptor >> 45) & 3,
        "present": (descriptor >> 47) & 1,
        "avl": (descriptor >> 52) & 1,
        "l": (descriptor >> 53) & 1,
        "db": (descriptor >> 54) & 1,
        "g": granular,
        "unusable": 0,  # a loaded segment; VMMs write the whole kvm_segment
        "padding": 0,
    }


class _Guest:
    """A guest program: its memory, its starting state and what proves it.

    ``image`` is loaded at guest physical address ``base`` (``mem_size``
    bytes); ``arch`` is "x86_64" or "aarch64".  ``sregs`` are the
    special-register fields set on top of KVM's reset state (segments as
    dicts of kvm_segment fields).  ``marks`` names the instruction at each
    code offset, so a stop is reported by instruction.
    """

    def __init__(
        self,
        name: str,
        image: bytes,
        mem_size: int,
        entry: int,
        sregs: dict[str, Any],
        regs: dict[str, int],
        *,
        marks: dict[int, str] | None = None,
        loop: int = -1,
        cx16_area: int = -1,
        base: int = 0,
        arch: str = "x86_64",
    ) -> None:
        self.name = name
        self.base = base
        self.arch = arch
        self.image = image
        self.mem_size = mem_size
        self.entry = entry
        self.sregs = sregs
        self.regs = regs
        self.marks = marks or {}
        self.loop = loop
        self.cx16_area = cx16_area
        self._wanted: Any = None
        self.pooled = False  # a cached guest's sessions keep their buffers (_Kit)

    def wanted(self) -> tuple[Any, list[tuple[int, int]]]:
        """The special registers to set, as a kvm_sregs, and their byte ranges.

        Made once, under the cache lock: operations hold only its address,
        so a second copy made by a racing thread could be freed while the
        first one's operations still point at it.  Callers keep a reference
        for as long as their operations run.
        """
        if self._wanted is None:
            with _CACHE_LOCK:
                if self._wanted is None:
                    struct = _abi().KvmSregs()
                    _assign(struct, self.sregs)
                    self._wanted = (struct, _patches(struct, self.sregs))
        wanted: tuple[Any, list[tuple[int, int]]] = self._wanted
        return wanted

    @property
    def long_mode(self) -> bool:
        return bool(self.sregs.get("efer", 0) & _EFER_LMA)


def _patches(struct: Any, wanted: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(offset, size) byte ranges of ``struct`` covering the wanted fields, merged."""
    spans = []
    for name, value in wanted.items():
        field = getattr(type(struct), name)
        if isinstance(value, dict):
            inner = getattr(struct, name)
            spans += [(field.offset + o, s) for o, s in _patches(inner, value)]
        else:
            spans.append((field.offset, field.size))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for offset, size in spans:
        if merged and merged[-1][0] + merged[-1][1] == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + size)
        else:
            merged.append((offset, size))
    return merged


def _assign(struct: Any, wanted: Mapping[str, Any]) -> None:
    """Set the wanted (possibly nested) fields of a ctypes structure."""
    for name, value in wanted.items():
        if isinstance(value, dict):
            _assign(getattr(struct, name), value)
        else:
            setattr(struct, name, value)


# 16-bit real mode: "mov eax, PROOF_VALUE" (operand-size prefix 66 B8 imm32),
# then "hlt" (F4): BoxLite's own smoke test, the bare device check.
_GUEST_HALT = b"\x66\xb8" + PROOF_VALUE.to_bytes(4, "little") + b"\xf4"


def _real_mode_guest(code: bytes = _GUEST_HALT) -> _Guest:
    """Real-mode code at address 0: the bare device check's trivial guest."""
    regs = {"rip": 0, "rflags": 0x2}
    return _Guest("real-mode", code, 0x1000, 0, {"cs": {"base": 0, "selector": 0}}, regs)


# The arm64 guest, at guest physical 0x10000 (little-endian words): movz x0,
# #0x117e; movk x0, #0xb0c5, lsl #16; movz x1, #0x10, lsl #16; str w0, [x1];
# b .  It writes the proof value to 0x100000, where there is no memory: KVM
# exits with KVM_EXIT_MMIO, and X0 holds the value.
_ARM64_CODE = (0xD2822FC0, 0xF2B618A0, 0xD2A00201, 0xB9000020, 0x14000000)
_ARM64_BASE, _ARM64_MMIO = 0x10000, 0x100000


def _aarch64_guest(words: Sequence[int] = _ARM64_CODE) -> _Guest:
    """The arm64 guest: one page at 0x10000, PC there, EL1 with interrupts
    masked (KVM_ARM_VCPU_INIT's reset state); it proves itself by MMIO."""
    image = b"".join(word.to_bytes(4, "little") for word in words)
    base = _ARM64_BASE
    return _Guest("aarch64", image, 0x1000, base, {}, {}, base=base, arch="aarch64")


# Long-mode guest memory: the boot GDT where Firecracker puts it, identity
# page tables (PML4, PDPT, PD with one 2 MiB page), code, data, stack.
_LM_GDT, _LM_PML4, _LM_PDPT, _LM_PD = 0x500, 0x1000, 0x2000, 0x3000
_LM_CODE, _LM_DATA, _LM_XSAVE, _LM_STACK, _LM_SIZE = 0x4000, 0x5000, 0x5040, 0x7FF0, 0x8000
_PROOF = PROOF_VALUE.to_bytes(4, "little")
_JNZ_FAILED = b"\x75"  # jnz rel8 to the failure stop: the result was wrong

#: The long-mode guest's stages, in order: what a stock Linux kernel runs
#: early and an instruction emulator may lack.  Each is (stage number, the
#: instruction as messages name it, the CPUID feature without which the
#: stage is skipped (None: always run), set-up bytes, the instruction's
#: bytes, bytes after it).  The guest writes the stage number to R15 before
#: its set-up, so a stop is reported by stage; _long_mode_program assembles
#: the table, and the stage names, the "ran" list and the failure text all
#: come from it.  R8 holds CPUID leaf 1's ECX from stage 1 on.
LONG_MODE_STAGES: tuple[tuple[int, str, str | None, bytes, bytes, bytes], ...] = (
    (1, "cpuid", None, b"\xb8\x01\x00\x00\x00\x31\xc9", b"\x0f\xa2", b"\x41\x89\xc8"),
    # mov edi, data; xor eax, eax; xor edx, edx; mov ebx, proof; mov ecx,
    # proof; then lock cmpxchg16b [rdi]: the compare must match (ZF set).
    (
        2,
        "lock cmpxchg16b",
        "cx16",
        b"\xbf"
        + _LM_DATA.to_bytes(4, "little")
        + b"\x31\xc0\x31\xd2\xbb"
        + _PROOF
        + b"\xb9"
        + _PROOF,
        b"\xf0\x48\x0f\xc7\x0f",
        _JNZ_FAILED,
    ),
    # mov rax, cr4; or eax, OSXSAVE; then mov cr4, rax.
    (
        3,
        "mov cr4 (OSXSAVE)",
        "xsave",
        b"\x0f\x20\xe0\x0d" + _CR4_OSXSAVE.to_bytes(4, "little"),
        b"\x0f\x22\xe0",
        b"",
    ),
    # ecx = 0 (XCR0), edx:eax = 3 (x87 | SSE); then xsetbv.
    (4, "xsetbv", "xsave", b"\x31\xc9\xb8\x03\x00\x00\x00\x31\xd2", b"\x0f\x01\xd1", b""),
    # mov edi, the xsave area; edx:eax = 3; then xsave64 [rdi].
    (
        5,
        "xsave64",
        "xsave",
        b"\xbf" + _LM_XSAVE.to_bytes(4, "little") + b"\xb8\x03\x00\x00\x00\x31\xd2",
        b"\x48\x0f\xae\x27",
        b"",
    ),
    (6, "xrstor64", "xsave", b"", b"\x48\x0f\xae\x2f", b""),
    # mov eax, proof; then hlt.
    (7, "mov eax (proof value)", None, b"", b"\xb8" + _PROOF, b"\xf4"),
)
#: The stage numbers, by name: where a stopped guest was.
STAGES = {number: name for number, name, *_ in LONG_MODE_STAGES}
_STAGE_PASSED = LONG_MODE_STAGES[-1][0]
_STAGE_FAILED = _STAGE_PASSED + 1  # the guest saw a wrong result and halted without the proof
# The speed loop's body: "dec ecx; jnz .-2".  The guest runs it with RCX set;
# the host runs the same bytes as "mov ecx, edi; <body>; ret".
_LOOP_BODY = b"\xff\xc9\x75\xfc"
_HOST_LOOP = b"\x89\xf9" + _LOOP_BODY + b"\xc3"


def _long_mode_program() -> tuple[bytes, dict[int, str], dict[str, int]]:
    """Assemble LONG_MODE_STAGES; return (code, marks by offset, labels).

    A run of stages that one CPUID feature enables is skipped as a whole
    when the supported CPUID lacks it (``bt r8d, bit; jnc`` past the run).
    After the stages: the failure stop (stage _STAGE_FAILED, EAX 0, hlt) and
    the speed loop (``dec ecx; jnz``, RCX iterations, hlt).
    """
    code = bytearray()
    marks: dict[int, str] = {}
    labels: dict[str, int] = {}
    fixups: list[tuple[int, str]] = []

    def jump(opcode: bytes, label: str) -> None:
        code.extend(opcode + b"\x00")
        fixups.append((len(code) - 1, label))

    previous: str | None = None
    for number, name, feature, setup, instruction, after in LONG_MODE_STAGES:
        if feature != previous:
            labels[f"after {previous}"] = len(code)
            if feature is not None:
                leaf, register, bit = CPUID_FEATURES[feature]
                assert (leaf, register) == (1, "ecx"), feature  # what R8 holds
                code.extend(b"\x41\x0f\xba\xe0" + bytes([bit]))  # bt r8d, bit
                jump(b"\x73", f"after {feature}")  # jnc: not offered, skip the run
            previous = feature
        code.extend(b"\x41\xbf" + number.to_bytes(4, "little"))  # mov r15d, number
        code.extend(setup)
        marks[len(code)] = name
        code.extend(instruction)
        if after == _JNZ_FAILED:
            jump(_JNZ_FAILED, "failed")
        else:
            code.extend(after)
    marks[len(code) - 1] = "hlt"
    labels["failed"] = len(code)
    code.extend(b"\x41\xbf" + _STAGE_FAILED.to_bytes(4, "little") + b"\x31\xc0")  # xor eax, eax
    marks[len(code)] = "hlt"
    code.extend(b"\xf4")
    labels["loop"] = len(code)
    marks[len(code)] = "dec ecx; jnz (speed loop)"
    code.extend(_LOOP_BODY + b"\xf4")
    for at, label in fixups:
        offset = labels[label] - (at + 1)
        assert -128 <= offset < 128, label
        code[at] = offset & 0xFF
    return bytes(code), marks, labels


def _long_mode_guest() -> _Guest:
    """A guest entered directly in 64-bit mode, as Linux is by direct boot.

    The state is the one Firecracker, cloud-hypervisor and libkrun give a
    Linux kernel (the 64-bit boot protocol): the boot GDT, identity-mapped
    page tables, CR0/CR4/EFER with paging in long mode.
    """
    code, marks, labels = _long_mode_program()
    image = bytearray(_LM_SIZE)
    gdt = [0, 0, _gdt_entry(_GDT_CODE64, 0, 0xFFFFF), _gdt_entry(_GDT_DATA64, 0, 0xFFFFF)]
    for i, entry in enumerate(gdt):
        image[_LM_GDT + 8 * i : _LM_GDT + 8 * i + 8] = entry.to_bytes(8, "little")
    image[_LM_PML4 : _LM_PML4 + 8] = (_LM_PDPT | _KERNPG_TABLE).to_bytes(8, "little")
    image[_LM_PDPT : _LM_PDPT + 8] = (_LM_PD | _KERNPG_TABLE).to_bytes(8, "little")
    image[_LM_PD : _LM_PD + 8] = (0 | _PAGE_KERNEL_LARGE).to_bytes(8, "little")
    image[_LM_CODE : _LM_CODE + len(code)] = code
    sregs = _long_mode_sregs(_LM_GDT, len(gdt), _LM_PML4)
    regs = {"rip": _LM_CODE, "rsp": _LM_STACK, "rflags": 0x2}
    return _Guest(
        "long-mode",
        bytes(image),
        _LM_SIZE,
        _LM_CODE,
        sregs,
        regs,
        marks={_LM_CODE + k: v for k, v in marks.items()},
        loop=_LM_CODE + labels["loop"],
        cx16_area=_LM_DATA,
    )


def _long_mode_sregs(gdt: int, entries: int, pml4: int) -> dict[str, Any]:
    """The 64-bit boot protocol's special registers: __BOOT_CS/__BOOT_DS
    loaded from the boot GDT at ``gdt``, paging from ``pml4``, long mode."""
    code = _segment(_BOOT_CS, _gdt_entry(_GDT_CODE64, 0, 0xFFFFF))
    data = _segment(_BOOT_DS, _gdt_entry(_GDT_DATA64, 0, 0xFFFFF))
    return {
        "cs": code,
        **{name: data for name in ("ds", "es", "fs", "gs", "ss")},
        "gdt": {"base": gdt, "limit": 8 * entries - 1},
        "cr0": _CR0_LINUX,
        "cr3": pml4,
        "cr4": _CR4_PAE,
        "efer": _EFER_LME | _EFER_LMA,
    }


def _guest(kind: str) -> _Guest:
    """The guest of a kind: "real-mode", "long-mode" or "aarch64" (made once)."""
    made: _Guest | None = _CACHE.get(f"guest-{kind}")
    if made is not None:  # every check after the first
        return made
    makers = {"real-mode": _real_mode_guest, "long-mode": _long_mode_guest}
    makers["aarch64"] = _aarch64_guest
    if kind not in makers:
        choices = ", ".join(repr(k) for k in makers)
        raise InvalidArgumentError(f"guest must be one of {choices}, got {kind!r}")
    guest: _Guest = _cached(f"guest-{kind}", lambda: _kept(makers[kind]()))
    return guest


def _kept(guest: _Guest) -> _Guest:
    guest.pooled = True
    return guest


# ── The operations both backends execute ────────────────────────────────────

# Operation kinds, result checks and flags (kvm_smoke.c has the same numbers).
_OP_IOCTL, _OP_COPY, _OP_MAP_RUN, _OP_RUN, _OP_UNLESS = 1, 2, 3, 4, 5
_CHECK_NONE, _CHECK_EQ, _CHECK_GE = 0, 1, 2
_OPF_SOFT = 1  # a failure stores -errno in the value slot and goes on
# struct kvmsmoke_op, packed: step kind fd fd_out value_out check flags pad,
# check_value, then request arg src len.
_OP_FORMAT, _OP_SIZE = "=8iq4Q", 72
_OP_WORDS, _OP_SRC_WORD = 9, 7  # 64-bit words per operation; src's word in it
_KVM, _VM, _VCPU = 0, 1, 2  # descriptor slots
_STARTUP_VM, _SPLIT_VM = 3, 4  # the start-up ioctls' VMs (see _startup_ops)
# Value slots.
_V_API, _V_RUN_SIZE, _V_CPUID, _V_BOOT_MSRS, _V_MSR_LIST, _V_FEATURE_LIST = range(6)
_V_ARCH_GET, _V_ARCH_SET, _V_T_WARM, _V_T_BASE, _V_T_SHORT, _V_T_LONG = range(6, 12)
_V_T_GUEST, _V_T_BASE2, _V_T_LONG2, _V_T_SHORT2 = range(12, 16)
# The speed probe's bounds, each [lo, hi): the short runs' (go on to the
# long ones) and the long runs' (go on to the final run).
_V_SHORT_LO, _V_SHORT_HI, _V_LONG_LO, _V_LONG_HI = range(16, 20)
# The start-up ioctls' VMs, then their answers, one slot per ioctl.
_V_STARTUP_VM, _V_SPLIT_VM, _V_STARTUP = 20, 21, 22


class _Plan:
    """An array of operations under construction.

    Each op is a tuple in struct kvmsmoke_op's field order: step, kind, fd,
    fd_out, value_out, check, flags, pad, check_value, request, arg, src, len.
    """

    def __init__(self) -> None:
        self.ops: list[tuple[int, ...]] = []

    def ioctl(
        self,
        step: int,
        fd: int,
        request: int,
        arg: int = 0,
        *,
        fd_out: int = -1,
        value: int = -1,
        check: int = _CHECK_NONE,
        expect: int = 0,
        soft: bool = False,
    ) -> None:
        flags = _OPF_SOFT if soft else 0
        self.ops.append(
            (step, _OP_IOCTL, fd, fd_out, value, check, flags, 0, expect, request, arg, 0, 0)
        )

    def copy(self, step: int, dest: int, src: int, size: int) -> None:
        self.ops.append((step, _OP_COPY, 0, -1, -1, 0, 0, 0, 0, 0, dest, src, size))

    def map_run(self, step: int) -> None:
        self.ops.append((step, _OP_MAP_RUN, _VCPU, -1, -1, 0, 0, 0, 0, 0, 0, _V_RUN_SIZE, 0))

    def run(self, timeout_ns: int, signo: int, value: int) -> None:
        # check_value carries the step reported when arming the bound fails;
        # the cookie (src) is stamped afresh each time the array executes.
        self.ops.append(
            (
                STEP_RUN,
                _OP_RUN,
                _VCPU,
                -1,
                value,
                0,
                0,
                0,
                STEP_ARM_TIMER,
                timeout_ns,
                signo,
                0,
                0,
            )
        )

    def unless(self, step: int, slots: tuple[int, int, int, int, int, int]) -> None:
        """Append: go on only while lo <= max(x, 1) < hi, where
        x = min(v[a], v[b]) - min(v[c], v[d]) and lo, hi are v[e], v[f]
        for ``slots`` (a, b, c, d, e, f) of the outcome's values; otherwise
        the array ends here, all having run (the outcome's ``stopped``)."""
        packed = sum(slot << 8 * k for k, slot in enumerate(slots))
        self.ops.append((step, _OP_UNLESS, 0, -1, -1, 0, 0, 0, 0, packed, 0, 0, 0))

    def build(self) -> tuple[Any, int]:
        """The operations as a struct kvmsmoke_op array, and their count."""
        import struct

        count = len(self.ops)
        layout = struct.Struct(_OP_FORMAT)
        raw = b"".join([layout.pack(*op) for op in self.ops]) or bytes(layout.size)
        return (_abi().Op * max(1, count)).from_buffer_copy(raw), count


# ── Backends: execute an operation array ────────────────────────────────────


class _NativeBackend:
    """Runs the operations in libkvmsmoke.so (one foreign call per array)."""

    name = "native"

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib

    def execute(self, ops: Any, count: int, state: Any, out: Any) -> None:
        """Run the array; after another signal stopped a run, resume it.

        Returning to Python between the two is what lets that signal's
        handler run (KeyboardInterrupt reaches the caller at once); the run
        keeps its deadline in ``state``, so resuming never extends the bound.
        """
        import ctypes

        start = 0
        while True:
            self.lib.kvmsmoke_exec(
                ctypes.byref(ops, start * _OP_SIZE),
                count - start,
                ctypes.byref(state),
                ctypes.byref(out),
            )
            out.op_index += start
            if not out.interrupted:
                return
            import time

            if state.deadline_ns and time.monotonic_ns() >= state.deadline_ns:
                # KVM_RUN keeps answering EINTR with no signal of ours (a
                # policy, say): the bound has passed all the same.
                out.timed_out, out.error, out.interrupted = 1, 0, 0
                state.deadline_ns = 0
                return
            start = out.op_index

    def release(self, state: Any) -> None:
        self.releaser(state)()

    def releaser(self, state: Any) -> Callable[[], None]:
        """A call that releases the state, made of C only: a caller's signal
        handler cannot interrupt it half-way (see _run_program)."""
        import ctypes

        release: Callable[[], None] = _partial()(self.lib.kvmsmoke_release, ctypes.byref(state))
        return release


def _unless_ends(step: int, request: int, values: Any) -> bool:
    """Whether an OP_UNLESS (see _Plan.unless) ends its array."""
    a, b, c, d, lo, hi = (request & 0xFFFFFFFFFFFF).to_bytes(6, "little")
    if max(a, b, c, d, lo, hi) >= _VALUE_SLOTS:
        raise _StepFailed(step, errno.EINVAL)
    x = min(values[a], values[b]) - min(values[c], values[d])
    return not values[lo] <= max(x, 1) < values[hi]


class _PythonBackend:
    """Runs the same operations from Python through the C library's calls."""

    name = "python"

    def execute(self, ops: Any, count: int, state: Any, out: Any) -> None:
        import ctypes
        import struct

        out.step, out.error, out.timed_out, out.stopped = -1, 0, 0, 0
        libc = _sys_libc()  # looked up once per array, not once per ioctl
        # The operations as tuples, in one pass in C: each field read of a
        # ctypes structure is a call of its own.  Nothing changes an array
        # while it runs.
        raw = ctypes.string_at(ctypes.addressof(ops), count * _OP_SIZE)
        index = -1
        try:
            for op in struct.iter_unpack(_OP_FORMAT, raw):
                index += 1
                if self._one(op, state, out, libc):
                    out.stopped = 1
                    break
        except _StepFailed as failed:
            out.step, out.error = failed.step, failed.error
        finally:
            if index >= 0:
                out.op_index = index  # where it stopped, whatever stopped it

    def _one(self, op: tuple[int, ...], state: Any, out: Any, libc: ctypes.CDLL) -> bool:
        """Run one operation; return True when it ends the array (OP_UNLESS)."""
        step, kind, fd, fd_out, value_out, check, flags, _, expect, request, arg, src, size = op
        if kind == _OP_IOCTL:
            try:
                if fd_out >= 0:  # a descriptor: owned by the state at once
                    ret = self._owned(libc, state, fd, request, arg, fd_out)
                else:  # _ioctl, its call made here: most operations are these
                    ret = int(libc.ioctl(state.fds[fd], _wide(request), _wide(arg)))
                    if ret < 0:
                        ret = _ioctl_failed(libc, state.fds[fd], request, arg, True)
            except _SysError as err:
                if flags & _OPF_SOFT:
                    if value_out >= 0:
                        out.values[value_out] = -(err.errno or 0)
                    return False
                raise _StepFailed(step, err.errno or 0) from err
            if value_out >= 0:
                out.values[value_out] = ret
            if check == _CHECK_EQ and ret != expect:
                raise _StepFailed(step, 0)
            if check == _CHECK_GE and ret < expect:
                raise _StepFailed(step, errno.EPROTO)
        elif kind == _OP_COPY:
            import ctypes  # here, not above: most operations are ioctls

            ctypes.memmove(arg, src, size)
        elif kind == _OP_MAP_RUN:
            if self._owned(libc, state, fd, 0, int(out.values[src]), -1) < 0:
                import ctypes

                raise _StepFailed(step, ctypes.get_errno())
        elif kind == _OP_RUN:
            import ctypes

            if not state.run_addr:
                raise _StepFailed(step, errno.EFAULT)
            failed: _StepFailed | None = None
            try:
                elapsed = _python_run(state.fds[fd], state, out, request, arg, src, expect)
            except _StepFailed as err:
                failed, elapsed = err, 0
            ctypes.memmove(out.run_head, state.run_addr, min(state.run_size, _RUN_HEAD))
            if value_out >= 0:
                out.values[value_out] += elapsed
            if failed is not None:
                raise failed
            if out.timed_out:
                raise _StepFailed(step, 0)
        elif kind == _OP_UNLESS:
            return _unless_ends(step, request, out.values)
        else:
            raise _StepFailed(step, errno.EINVAL)
        return False

    def _owned(
        self, libc: ctypes.CDLL, state: Any, fd: int, request: int, arg: int, fd_out: int
    ) -> int:
        """Make a descriptor (the ioctl ``request`` on slot ``fd``, into slot
        ``fd_out``) or, with ``fd_out`` -1, map ``arg`` bytes of the run
        area, and store it in the state, with every signal blocked in
        between: a handler of the caller's that raised between the kernel's
        answer and the store would leak it.  The caller's mask is kept in C
        memory with a sentinel (see _unsaved_mask), so it is restored
        exactly when it was changed, wherever an exception comes."""
        import ctypes

        saved = _unsaved_mask()
        try:
            _block_signals(libc, saved)
            if fd_out < 0:
                prot, flags = _PROT_READ | _PROT_WRITE, _MAP_SHARED
                addr = libc.mmap(None, arg, prot, flags, state.fds[fd], 0)
                if addr in (None, ctypes.c_void_p(-1).value):
                    return -1
                state.run_addr, state.run_size = addr, arg
                return 0
            deadline = 0
            while True:  # EINTR: a policy's, the signals being blocked (see _ioctl)
                ret = int(libc.ioctl(state.fds[fd], _wide(request), _wide(arg)))
                if ret >= 0:
                    state.fds[fd_out] = ret  # KVM sets O_CLOEXEC on its descriptors
                    return ret
                err = ctypes.get_errno()
                if err != errno.EINTR:
                    raise _SysError(err, os.strerror(err))
                import time

                deadline = deadline or time.monotonic_ns() + _EINTR_RETRY_NS
                if time.monotonic_ns() >= deadline:
                    raise _SysError(err, os.strerror(err))
        finally:
            _restore_signals(libc, saved)

    def release(self, state: Any) -> None:
        """Unmap and close what the state holds, with every signal blocked
        (as in _owned): each entry is cleared before its call, so a release
        is never made twice, and a caller's handler that raised between the
        clearing and the call would leak the mapping or the descriptor.
        An exception before the first step leaves the state whole, to be
        released again."""
        libc = _sys_libc()
        saved = _unsaved_mask()
        try:
            _block_signals(libc, saved)
            addr, size = state.run_addr, state.run_size
            state.run_addr = state.run_size = 0
            if addr:
                libc.munmap(addr, size)
            for slot in range(_FD_SLOTS - 1, 0, -1):
                fd = state.fds[slot]
                state.fds[slot] = -1
                if fd >= 0:
                    os.close(fd)
        finally:
            _restore_signals(libc, saved)

    def releaser(self, state: Any) -> Callable[[], None]:
        release: Callable[[], None] = _partial()(self.release, state)
        return release


def _partial() -> Any:
    """functools.partial, from its C module: importing functools (and with
    it collections) would cost a first check milliseconds on a lean start."""
    return __import__("_functools").partial


class _StepFailed(Exception):
    def __init__(self, step: int, error: int) -> None:
        super().__init__(step, error)
        self.step = step
        self.error = error


class _SysError(OSError):
    """An error a system call of ours returned (never one a caller raised)."""


def _sys_libc() -> ctypes.CDLL:
    """The C library with the calls the Python backend makes, declared."""
    libc: ctypes.CDLL = _cached("libc", _declared_libc)
    return libc


def _declared_libc() -> ctypes.CDLL:
    import ctypes

    libc = _libc()
    c_int, c_long, c_size_t, c_void_p = (
        ctypes.c_int,
        ctypes.c_long,
        ctypes.c_size_t,
        ctypes.c_void_p,
    )
    # The calls a check makes many times (ioctl, syscall, sigtimedwait,
    # pthread_sigmask) have no argtypes, on purpose: a declared argument
    # costs a converter, a Python-level call, on every call (about 1,000
    # instructions each; three per ioctl, the Python backend's most
    # frequent call).  Their callers pass what ctypes passes as it is:
    # byref()s, ctypes arrays and values, None, small ints, and _wide()
    # for an ioctl's request and argument.
    libc.ioctl.restype = c_int
    libc.mmap.argtypes = [c_void_p, c_size_t, c_int, c_int, c_int, c_long]
    libc.mmap.restype = c_void_p
    libc.munmap.argtypes = [c_void_p, c_size_t]
    libc.munmap.restype = c_int
    libc.madvise.argtypes = [c_void_p, c_size_t, c_int]
    libc.madvise.restype = c_int
    libc.mprotect.argtypes = [c_void_p, c_size_t, c_int]
    libc.mprotect.restype = c_int
    libc.syscall.restype = c_long  # long syscall(long number, ...)
    libc.sigemptyset.argtypes = [c_void_p]
    libc.sigemptyset.restype = c_int
    libc.sigaddset.argtypes = [c_void_p, c_int]
    libc.sigaddset.restype = c_int
    libc.sigtimedwait.restype = c_int
    libc.pthread_sigmask.restype = c_int
    return libc


_C_INT_MAX = (1 << 31) - 1


def _wide(value: int) -> Any:
    """``value`` for an unsigned long argument of a call without argtypes
    (ioctl's): a Python int there goes as a C int, which the ABIs this
    checker runs on (x86_64, aarch64) widen by sign, so one up to
    _C_INT_MAX goes as itself and a larger one (an address, a request
    with its size bits) as a c_ulong.  Those are kept per value: the
    same requests and buffer addresses come back on every check."""
    if value <= _C_INT_MAX:
        return value
    kept: dict[int, Any] = _cached("wide-values", dict)
    made = kept.get(value)
    if made is None:
        import ctypes

        if len(kept) >= 4096:  # addresses of buffers no longer kept
            kept.clear()
        made = kept[value] = ctypes.c_ulong(value)
    return made


def _all_signals() -> Any:
    """A sigset with every signal (the kernel ignores SIGKILL and SIGSTOP)."""
    return _cached("all-signals", _every_signal)


# Blocking every signal around a step whose result must be stored: the
# caller's mask is saved into a sigset that starts out holding SIGKILL, a
# sentinel no real mask holds, and restored only once the kernel has
# written it.  The sigsets go by their ``bits`` arrays, which ctypes passes
# as pointers with no ctypes import or byref() here.
_UNSAVED = 1 << 8  # SIGKILL (signal 9): bit 8 of the first word


def _unsaved_mask() -> Any:
    """A sigset to save the caller's mask into, marked "not saved yet"."""
    saved = _abi().SigSet()
    saved.bits[0] = _UNSAVED
    return saved


def _block_signals(libc: ctypes.CDLL, saved: Any) -> None:
    libc.pthread_sigmask(0, _all_signals().bits, saved.bits)  # SIG_BLOCK


def _restore_signals(libc: ctypes.CDLL, saved: Any) -> None:
    """Put back the mask _block_signals saved, if it got as far as saving it."""
    if not saved.bits[0] & _UNSAVED:
        libc.pthread_sigmask(2, saved.bits, None)  # SIG_SETMASK


def _every_signal() -> Any:
    import ctypes

    every = _abi().SigSet()
    ctypes.memset(ctypes.addressof(every), 0xFF, ctypes.sizeof(every))
    return every


def _ioctl(
    fd: int, request: int, arg: int = 0, *, retry: bool = True, libc: ctypes.CDLL | None = None
) -> int:
    """ioctl(2) through the C library; raise _SysError.

    A call a signal interrupted (EINTR) is retried with every signal blocked
    (a caller's fast interval timer cannot starve it; the signals wait, and
    arrive when the mask is restored) for _EINTR_RETRY_NS at most: a policy
    that answers EINTR forever must not hang the check.  ``retry`` false
    returns EINTR as it came (KVM_RUN, whose bound is a signal).  ``libc``
    is _sys_libc(), for a caller that already has it.
    """
    if libc is None:
        libc = _sys_libc()
    ret = int(libc.ioctl(fd, _wide(request), _wide(arg)))
    if ret >= 0:
        return ret
    return _ioctl_failed(libc, fd, request, arg, retry)


def _ioctl_failed(libc: ctypes.CDLL, fd: int, request: int, arg: int, retry: bool) -> int:
    """After an ioctl answered -1: retry it as _ioctl says, or raise its errno."""
    import ctypes

    err = ctypes.get_errno()
    if err == errno.EINTR and retry:
        return _ioctl_masked(libc, fd, request, arg)
    raise _SysError(err, os.strerror(err))


def _ioctl_masked(libc: ctypes.CDLL, fd: int, request: int, arg: int) -> int:
    import ctypes
    import signal
    import time

    saved = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        deadline = time.monotonic_ns() + _EINTR_RETRY_NS
        while True:
            ret = int(libc.ioctl(fd, _wide(request), _wide(arg)))
            if ret >= 0:
                return ret
            err = ctypes.get_errno()
            if err != errno.EINTR or time.monotonic_ns() >= deadline:
                raise _SysError(err, os.strerror(err))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, saved)


def _cookie() -> int:
    """A value no one else puts in our timer signal's si_value: a random
    per-process base and a counter (thread-safe: next() on a count is atomic)."""
    cookie: int = next(_cached("cookie", _cookie_counter)) & _COOKIE_MASK
    return cookie


_COOKIE_MASK = 0x7FFFFFFFFFFFFFFF


def _cookie_counter() -> Any:
    import itertools

    return itertools.count(int.from_bytes(os.urandom(6), "little") << 16)


def _timer_signal() -> int:
    """The real-time signal that bounds KVM_RUN (blocked outside KVM_RUN)."""
    # The signal module's C core: already loaded at start-up, while the
    # module itself imports enum (a millisecond on the first check).
    core: Any = __import__("_signal")  # no stub of its own: typed as Any

    return int(core.SIGRTMAX) - 1


def _watchdog_signal() -> int:
    """The classic signal the watchdog raises (Linux never sends SIGSTKFLT).

    16 on x86 and in include/uapi/asm-generic/signal.h (arm64); the signal
    module names it only from Python 3.11.
    """
    return 16


class _Watchdog:
    """Raise the watchdog signal in the vCPU thread at a deadline, unless
    stopped first: the bound when no POSIX timer can be had.

    At RLIMIT_SIGPENDING 0 the kernel cannot queue a real-time signal, but it
    marks a classic one pending all the same (without its siginfo), so this
    signal carries no cookie: ``fired`` is set before it is sent, and an
    instance that comes unannounced is someone else's.
    """

    def __init__(self, ident: int, deadline_ns: int) -> None:
        import threading

        self.ident, self.deadline_ns = ident, deadline_ns
        self.fired = False
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        name = "boxlite-syscheck-watchdog"
        self.thread = threading.Thread(target=self._watch, name=name, daemon=True)
        self.thread.start()  # RuntimeError when no thread can be had

    def _watch(self) -> None:
        import signal
        import time

        wait = (self.deadline_ns - time.monotonic_ns()) / 1e9
        if self.stopped.wait(max(wait, 0.0)):
            return
        with self.lock:
            if not self.stopped.is_set():
                self.fired = True
                signal.pthread_kill(self.ident, _watchdog_signal())

    def stop(self) -> None:
        with self.lock:
            self.stopped.set()
        self.thread.join()


def _take_watchdog(watchdog: _Watchdog | None) -> tuple[bool, bool]:
    """Take a pending watchdog signal: (it was the watchdog's, it was someone else's)."""
    import signal

    if signal.sigtimedwait({_watchdog_signal()}, 0) is None:
        return False, False
    if watchdog is not None and watchdog.fired:
        return True, False
    return False, True


def _kvm_mask(vcpu: int, saved: set[Any], unblocked: set[int], arm_step: int) -> None:
    """KVM_SET_SIGNAL_MASK: the caller's mask, less our signals, inside KVM_RUN."""
    bits = sum(1 << (int(s) - 1) for s in saved if int(s) not in unblocked)
    _, address = _cached_in("kvm-masks", bits, _kvm_sigset, bits)
    _as_step(arm_step, _ioctl, vcpu, KVM_SET_SIGNAL_MASK, address)


def _kvm_sigset(bits: int) -> tuple[Any, int]:
    """A struct kvm_signal_mask holding ``bits``, and its address (made once
    per mask and kept: the kernel only reads it)."""
    import ctypes

    raw = (8).to_bytes(4, "little") + bits.to_bytes(8, "little")
    kept = (ctypes.c_uint8 * 12).from_buffer_copy(raw)
    return kept, ctypes.addressof(kept)


def _sigwait_args(signo: int) -> tuple[Any, Any]:
    """sigtimedwait()'s set of one signal and its zero timeout, by reference."""
    import ctypes

    abi, libc = _abi(), _sys_libc()
    only, zero = abi.SigSet(), abi.Timespec(0, 0)
    for made in (libc.sigemptyset(ctypes.byref(only)), libc.sigaddset(ctypes.byref(only), signo)):
        if made != 0:
            err = ctypes.get_errno()
            raise _SysError(err, os.strerror(err))
    # The references keep their structures alive.
    return ctypes.byref(only), ctypes.byref(zero)


def _take_pending(signo: int, cookie: int, stash: list[Any]) -> bool:
    """Take pending instances of our (blocked) signal: ours end the run,
    anyone else's are set aside to be queued again.  True when ours came."""
    import ctypes

    only, zero = _cached_in("sigwait", signo, _sigwait_args, signo)  # read-only once made
    info_type, libc = _abi().SigInfo, _sys_libc()
    mine = False
    while True:
        info = info_type()
        if libc.sigtimedwait(only, ctypes.byref(info), zero) != signo:
            return mine
        if (info.si_value or 0) == cookie and info.si_code in (_SI_TIMER, _SI_USER):
            mine = True
        elif len(stash) < _STASH:
            stash.append(info)


def _python_run(
    vcpu: int, state: Any, out: Any, bound_ns: int, signo: int, cookie: int, arm_step: int
) -> int:
    """KVM_RUN bounded as kvm_smoke.c bounds it; return the nanoseconds it took.

    A handler that raises (KeyboardInterrupt, say) propagates from here
    with the signal state restored; the deadline stays in ``state`` so a
    resumed run keeps its bound.
    """
    import ctypes
    import time

    # The signal module's C core: the module's wrappers turn every mask into
    # a set of enum members (microseconds per call, twice per run).
    signal: Any = __import__("_signal")
    libc = _sys_libc()
    if not state.deadline_ns:
        state.deadline_ns = time.monotonic_ns() + bound_ns
    saved = _as_step(arm_step, signal.pthread_sigmask, signal.SIG_BLOCK, {signo})
    stash: list[Any] = []
    timer = watchdog = None
    theirs_classic = finished = False
    try:
        _take_pending(signo, cookie, stash)  # someone else's, already pending
        _kvm_mask(vcpu, saved, {signo}, arm_step)
        try:
            tid = _thread.get_native_id()
            # Armed with every signal blocked until it is stored, as _owned
            # stores a descriptor: a caller's handler that raised between
            # the kernel's answer and the store would leave an armed timer
            # behind, whose signal, unblocked after the run, ends the process.
            unsaved = _unsaved_mask()
            try:
                _block_signals(libc, unsaved)
                timer = _timer_start(libc, signo, tid, state.deadline_ns, cookie)
            finally:
                _restore_signals(libc, unsaved)
            out.bound = BOUND_TIMER
        except _SysError as err:
            out.bound_error = err.errno or 0
            classic = _watchdog_signal()
            signal.pthread_sigmask(signal.SIG_BLOCK, {classic})
            theirs_classic = _take_watchdog(None)[1]
            _kvm_mask(vcpu, saved, {signo, classic}, arm_step)
            try:
                watchdog = _Watchdog(_thread.get_ident(), state.deadline_ns)
                out.bound = BOUND_WATCHDOG
            except RuntimeError:
                out.bound = BOUND_NONE  # the result still counts, unbounded
        clock, start = _run_clock()
        while True:
            out.runs += 1
            try:
                _ioctl(vcpu, KVM_RUN, 0, retry=False, libc=libc)
            except _SysError as err:
                if err.errno != errno.EINTR:
                    raise _StepFailed(STEP_RUN, err.errno or 0) from err
                if _take_pending(signo, cookie, stash):
                    out.timed_out = 1
                    break
                if watchdog is not None:
                    mine, theirs = _take_watchdog(watchdog)
                    theirs_classic = theirs_classic or theirs
                    if mine:
                        out.timed_out = 1
                        break
                if out.bound == BOUND_NONE and time.monotonic_ns() >= state.deadline_ns:
                    out.timed_out = 1
                    break
                continue  # another signal: its handler has run (or raised)
            break
        finished = True
        return max(clock() - start, 0)
    finally:
        if timer is not None:
            _timer_delete(libc, timer)
        if watchdog is not None:
            watchdog.stop()
            theirs_classic = _take_watchdog(watchdog)[1] or theirs_classic
        _take_pending(signo, cookie, stash)  # our late expiry goes; others stay
        signal.pthread_sigmask(signal.SIG_SETMASK, saved)
        for info in stash:  # queued again exactly as they came
            number = _syscall_numbers()[3]
            me = ctypes.c_int(os.getpid()), ctypes.c_int(_thread.get_native_id())
            if libc.syscall(number, *me, ctypes.c_int(signo), ctypes.byref(info)) == 0:
                out.requeued += 1
        if theirs_classic:
            signal.pthread_kill(_thread.get_ident(), _watchdog_signal())
        if finished:
            state.deadline_ns = 0


def _as_step(step: int, call: Callable[..., Any], *args: Any) -> Any:
    """Make one OS call as a step of the check: its error becomes _StepFailed.

    Only errors with an errno are the OS's: an exception a signal handler
    raises (a TimeoutError of the caller's, say) propagates unchanged.
    """
    try:
        return call(*args)
    except OSError as err:
        raise _StepFailed(step, _errno_of(err)) from err


def _interpreter_abi() -> str:
    """The ABI of this interpreter ("x86_64", "i386", "aarch64", "arm")."""
    multiarch = getattr(sys.implementation, "_multiarch", "") or ""
    arch = multiarch.split("-")[0] if multiarch else os.uname().machine
    wide = sys.maxsize > 2**32
    if arch in ("x86_64", "amd64", "i386", "i486", "i586", "i686"):
        return "x86_64" if wide else "i386"
    if arch in ("aarch64", "arm64") or arch.startswith("arm"):
        return "aarch64" if wide else "arm"
    return arch


def _syscall_numbers() -> tuple[int, int, int, int]:
    numbers: tuple[int, int, int, int] = _cached("syscalls", _timer_syscalls)
    return numbers


def _timer_syscalls() -> tuple[int, int, int, int]:
    abi = _interpreter_abi()
    try:
        return _SYSCALLS[abi]
    except KeyError:
        raise _SysError(errno.ENOSYS, f"no timer syscall numbers for the {abi} ABI") from None


def _timer_start(libc: ctypes.CDLL, signo: int, tid: int, deadline_ns: int, cookie: int) -> int:
    """Arm a one-shot timer that sends ``signo`` with ``cookie`` to thread
    ``tid`` at the CLOCK_MONOTONIC ``deadline_ns``."""
    import ctypes

    create, settime, _, _ = _syscall_numbers()
    abi = _abi()
    event = abi.SigEvent(
        sigev_value=cookie, sigev_signo=signo, sigev_notify=_SIGEV_THREAD_ID, tid=tid
    )
    # The clock, the flags and the timer's id are C ints, as ctypes passes
    # a Python int to a call without argtypes.
    timer_id = ctypes.c_int(-1)
    if libc.syscall(create, _CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(timer_id)) < 0:
        err = ctypes.get_errno()
        raise _SysError(err, os.strerror(err))
    when = abi.Itimerspec()
    when.it_value.tv_sec, when.it_value.tv_nsec = divmod(max(1, deadline_ns), 1_000_000_000)
    if libc.syscall(settime, timer_id.value, _TIMER_ABSTIME, ctypes.byref(when), None) < 0:
        err = ctypes.get_errno()
        _timer_delete(libc, timer_id.value)
        raise _SysError(err, os.strerror(err))
    return timer_id.value


def _timer_delete(libc: ctypes.CDLL, timer: int) -> None:
    import ctypes

    if libc.syscall(_syscall_numbers()[2], timer) < 0:  # a C int, as ctypes passes it
        _log("warning", "timer_delete failed: %s", errno_name(ctypes.get_errno()))


def _native_path() -> str:
    """Where the native library is looked for: the env var, else next to us."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return override
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), _LIBRARY_NAME)


def _load_native() -> tuple[ctypes.CDLL | None, str]:
    """Load and vet libkvmsmoke.so; return (library or None, why not)."""
    import ctypes

    path = _native_path()
    if not os.path.isabs(path):
        why = f"{LIBRARY_ENV}={path!r} is not an absolute path"
        _log("warning", "%s; using the Python backend", why)
        return None, why
    if not _exists(path):
        return None, f"{path} does not exist (run `make` to build it)"
    try:
        lib = _load_library(path)
        abi_version = lib.kvmsmoke_abi_version
        sizes = lib.kvmsmoke_sizes
        execute = lib.kvmsmoke_exec
        release = lib.kvmsmoke_release
    except (OSError, AttributeError) as err:
        _log("warning", "cannot use %s (%s); using the Python backend", path, err)
        return None, f"{path} cannot be used: {err}"
    abi = _abi()
    abi_version.argtypes = []
    abi_version.restype = ctypes.c_int
    sizes.argtypes = [ctypes.c_int]
    sizes.restype = ctypes.c_size_t
    # int kvmsmoke_exec(const struct kvmsmoke_op *ops, uint32_t count,
    #                   struct kvmsmoke_state *st, struct kvmsmoke_result *out)
    # void kvmsmoke_release(struct kvmsmoke_state *st)
    # No argtypes for these two, on purpose: their one caller (_NativeBackend)
    # passes byref()s, which ctypes passes as the pointers they hold, and a
    # count below 2**31, passed as an int.  Declared argtypes would run a
    # converter, a Python-level call, for each argument of each call: four
    # of them for each operation array, about 4,000 instructions.
    execute.restype = ctypes.c_int
    release.restype = None
    found = abi_version()
    if found != _NATIVE_ABI_VERSION:
        why = f"{path} has ABI version {found}, expected {_NATIVE_ABI_VERSION}"
        _log("warning", "%s; using the Python backend", why)
        return None, why
    expected = [ctypes.sizeof(t) for t in (abi.Op, abi.State, abi.Outcome)]
    if [sizes(i) for i in range(3)] != expected:
        _log("warning", "%s structure sizes differ; using the Python backend", path)
        return None, f"{path} reports a different structure layout"
    return lib, path


def native_backend() -> tuple[bool, str]:
    """Return (whether libkvmsmoke.so is usable, its path or why not)."""
    lib, note = _cached("native", _load_native)
    return lib is not None, note


def _backend_for(backend: str | None) -> Any:
    if backend not in (None, "native", "python"):
        raise InvalidArgumentError(f"backend must be 'native' or 'python', got {backend!r}")
    if backend != "python":
        lib, note = _cached("native", _load_native)
        if lib is not None:
            return _NativeBackend(lib)
        if backend == "native":
            facts = Facts()
            facts.note = note
            raise _render("native-missing", facts)
    return _PythonBackend()


# ── The smoke test ──────────────────────────────────────────────────────────


class SmokeResult:
    """How far the KVM smoke test got, and what the kernel answered.

    ``step`` is the step that failed (``STEP_DONE`` when all ran), ``error``
    the errno at that step (0 when none), ``exit_reason`` the KVM exit of the
    guest run (-1 when KVM_RUN never returned one), ``proof`` the guest's EAX.
    For the long-mode guest, ``instruction`` names where the guest stopped
    when it did not pass, ``speed`` compares guest and host speed and
    ``msrs`` says which MSRs KVM accepted.  ``ok`` is true only when the
    guest ran its code and halted with the proof.
    """

    __slots__ = tuple(
        "api_version backend bound cpuid cx16_value elapsed error exit_reason fail_entry_cpu guest "
        "hardware_entry_failure_reason insn_bytes instruction internal_data internal_suberror "
        "mmio msrs proof requeued rip runs speed stage step timed_out timeout".split()
    )

    def __init__(
        self, backend: str, timeout: float = DEFAULT_TIMEOUT, guest: str = "real-mode"
    ) -> None:
        self.backend = backend
        self.timeout = timeout
        self.guest = guest
        self.step = STEP_OPEN
        self.error = 0
        self.api_version = -1
        self.exit_reason = -1
        self.proof = 0
        self.rip = -1
        self.stage = 0
        self.instruction: str | None = None
        self.hardware_entry_failure_reason = 0
        self.fail_entry_cpu = 0
        self.internal_suberror = 0
        self.internal_data: tuple[int, ...] = ()
        self.insn_bytes = b""
        self.timed_out = False
        self.runs = 0
        self.elapsed = 0.0
        #: CPUID_FEATURES the supported CPUID offers (long mode only).
        self.cpuid: dict[str, bool] = {}
        self.cx16_value = 0
        self.speed: Speed | None = None
        self.msrs: dict[str, Any] = {}
        #: How KVM_RUN was bounded: "timer", "watchdog thread" or "none".
        self.bound: str | None = None
        #: Signals of the timer's number raised by others, queued again.
        self.requeued = 0
        #: The arm64 guest's MMIO exit: phys_addr, data, len, is_write.
        self.mmio: dict[str, Any] = {}

    @property
    def ok(self) -> bool:
        """True when the guest ran the expected code and proved it."""
        if self.step != STEP_DONE or self.proof != PROOF_VALUE:
            return False
        if self.guest == "aarch64":
            expected = {"phys_addr": _ARM64_MMIO, "data": PROOF_VALUE, "len": 4, "is_write": True}
            return self.exit_reason == KVM_EXIT_MMIO and self.mmio == expected
        if self.exit_reason != KVM_EXIT_HLT:
            return False
        if self.guest == "long-mode":
            swapped = PROOF_VALUE | PROOF_VALUE << 64
            cx16 = not self.cpuid.get("cx16") or self.cx16_value == swapped
            return self.stage == _STAGE_PASSED and cx16
        return True

    @property
    def ran(self) -> bool:
        """Whether guest code ran at all (the device works)."""
        return self.speed is not None or self.step == STEP_DONE

    @property
    def emulated(self) -> bool | None:
        """Whether guest code runs emulated in software (None: not measured)."""
        return None if self.speed is None else self.speed.emulated

    @property
    def step_name(self) -> str:
        return STEP_NAMES[self.step] if 0 <= self.step < len(STEP_NAMES) else str(self.step)

    def stages_run(self) -> list[str]:
        """The long-mode stages the supported CPUID let the guest run."""
        return [
            name
            for _, name, feature, *_ in LONG_MODE_STAGES
            if feature is None or self.cpuid.get(feature)
        ]

    def as_dict(self) -> dict[str, object]:
        """Return the result as plain JSON-ready values, with names."""
        sub = self.internal_suberror
        mmio = {k: v if isinstance(v, bool) else hex(v) for k, v in self.mmio.items()}
        return {
            "backend": self.backend,
            "guest": self.guest,
            "ok": self.ok,
            "step": self.step_name,
            "errno": errno.errorcode.get(self.error) if self.error else None,
            "error": os.strerror(self.error) if self.error else None,
            "api_version": self.api_version,
            "exit_reason": self.exit_reason,
            "exit_name": EXIT_REASONS.get(self.exit_reason) if self.exit_reason >= 0 else None,
            "proof": f"{self.proof:#x}",
            "rip": f"{self.rip:#x}" if self.rip >= 0 else None,
            "instruction": self.instruction,
            "hardware_entry_failure_reason": self.hardware_entry_failure_reason,
            "fail_entry_cpu": self.fail_entry_cpu,
            "internal_suberror": sub,
            "internal_suberror_name": INTERNAL_SUBERRORS.get(sub) if sub else None,
            "internal_data": [f"{value:#x}" for value in self.internal_data] or None,
            "insn_bytes": self.insn_bytes.hex(" ") or None,
            "timed_out": self.timed_out,
            "timeout_s": self.timeout,
            "bound": self.bound,
            "runs": self.runs,
            "elapsed_s": round(self.elapsed, 6),
            "cpuid": self.cpuid or None,
            "speed": self.speed.as_dict() if self.speed is not None else None,
            "msrs": self.msrs or None,
            "mmio": mmio or None,
        }

    def __repr__(self) -> str:
        if self.ok:
            return (
                f"<SmokeResult {self.guest} guest ran and proved it ({self.proof:#x}), "
                f"{self.elapsed * 1e3:.2f} ms, {self.backend} backend>"
            )
        what = errno_name(self.error) if self.error else "no errno"
        if self.exit_reason >= 0:
            what = exit_name(self.exit_reason)
            if self.instruction:
                what += f" at {self.instruction}"
        if self.timed_out:
            what = f"timed out after {self.timeout:g} s"
        return (
            f"<SmokeResult {self.guest} guest failed at {self.step_name!r}: {what}, "
            f"{self.backend} backend>"
        )


def _outcome(result: SmokeResult) -> tuple[object, ...]:
    """The fields that must agree between backends (not timing, not backend)."""
    return (
        result.guest,
        result.step,
        result.error,
        result.api_version,
        result.exit_reason,
        result.proof,
        result.stage,
        result.instruction,
        result.hardware_entry_failure_reason,
        result.fail_entry_cpu,
        result.internal_suberror,
        result.insn_bytes.hex(),
        result.timed_out,
        tuple(sorted(result.cpuid.items())),
        result.cx16_value,
        tuple(sorted((k, str(v)) for k, v in result.msrs.items())),
        tuple(sorted(result.mmio.items())),
        result.emulated,
    )


class Speed:
    """The guest loop's speed against the same loop on the host CPU."""

    __slots__ = ("guest_ns", "host_ns", "iterations", "note")

    def __init__(
        self, guest_ns: float, host_ns: float | None, iterations: int, note: str = ""
    ) -> None:
        self.guest_ns = guest_ns
        self.host_ns = host_ns
        self.iterations = iterations
        self.note = note

    @property
    def ratio(self) -> float | None:
        if self.host_ns is None or self.host_ns <= 0:
            return None
        return self.guest_ns / self.host_ns

    @property
    def emulated(self) -> bool | None:
        ratio = self.ratio
        return None if ratio is None else ratio >= EMULATION_RATIO

    def describe(self) -> str:
        text = f"{_ns(self.guest_ns)} ns per guest loop iteration"
        if self.ratio is not None:
            return text + f", about {_times(self.ratio)} times the same loop on the host CPU"
        return text + f" (host not measured: {self.note})"

    def as_dict(self) -> dict[str, object]:
        return {
            "guest_ns_per_iteration": round(self.guest_ns, 3),
            "host_ns_per_iteration": None if self.host_ns is None else round(self.host_ns, 3),
            "ratio": None if self.ratio is None else round(self.ratio, 2),
            "iterations": self.iterations,
            "emulated": self.emulated,
            "threshold_ratio": EMULATION_RATIO,
            "note": self.note or None,
        }


def _times(ratio: float) -> str:
    return f"{ratio:,.0f}" if ratio >= 10 else f"{ratio:.2g}"


def _ns(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _host_loop() -> Callable[[int], None]:
    """The speed loop's bytes as a host function (a page mapped RW, then RX)."""
    import ctypes

    def load() -> Callable[[int], None]:
        libc = _sys_libc()
        page = os.sysconf("SC_PAGE_SIZE")
        rw, private = _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_ANONYMOUS
        addr = libc.mmap(None, page, rw, private, -1, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), "mmap")
        ctypes.memmove(addr, _HOST_LOOP, len(_HOST_LOOP))
        # Never writable and executable at once.
        if libc.mprotect(addr, page, _PROT_READ | _PROT_EXEC) != 0:
            err = ctypes.get_errno()
            libc.munmap(addr, page)
            raise OSError(err, os.strerror(err), "mprotect")
        function: Callable[[int], None] = ctypes.CFUNCTYPE(None, ctypes.c_uint32)(addr)
        return function

    loop: Callable[[int], None] = _cached("host_loop", load)
    return loop


def _run_clock() -> tuple[Callable[[], int], int]:
    """The clock a run (and the host loop) is timed on, and its first
    reading: the thread's CPU time, as kvm_smoke.c's run_clock, so that a
    task sharing the CPU is not charged to the guest; where a policy
    refuses that clock, the monotonic one."""
    import time

    try:
        return time.thread_time_ns, time.thread_time_ns()
    except OSError:
        return time.monotonic_ns, time.monotonic_ns()


def _host_ns_per_iteration(iterations: int) -> tuple[float | None, str]:
    """Time the speed loop on the host CPU: (ns per iteration or None, why not)."""
    try:
        loop = _host_loop()
    except OSError as err:
        return None, f"cannot map the host loop executable: {errno_name(_errno_of(err))}"
    best = None
    for _ in range(2):
        clock, start = _run_clock()
        loop(iterations)
        took = clock() - start
        best = took if best is None else min(best, took)
    assert best is not None
    return best / iterations, ""


def _decode_run(result: SmokeResult, head: bytes) -> None:
    """Fill the exit fields from the copied head of struct kvm_run."""
    import struct

    unpack = struct.unpack_from  # little-endian, as on both architectures KVM runs here
    (reason,) = unpack("<I", head, _RUN_EXIT_REASON)
    result.exit_reason = reason
    if reason == KVM_EXIT_FAIL_ENTRY:
        (result.hardware_entry_failure_reason,) = unpack("<Q", head, _RUN_FAIL_ENTRY_REASON)
        (result.fail_entry_cpu,) = unpack("<I", head, _RUN_FAIL_ENTRY_CPU)
    elif reason == KVM_EXIT_INTERNAL_ERROR:
        suberror, ndata = unpack("<II", head, _RUN_INTERNAL_SUBERROR)  # ndata follows
        result.internal_suberror, ndata = suberror, min(ndata, 16)
        result.internal_data = unpack(f"<{ndata}Q", head, _RUN_INTERNAL_DATA)
        flags = result.internal_data[0] if ndata else 0
        has_bytes = flags & _EMULATION_FLAG_INSTRUCTION_BYTES
        if suberror == 1 and ndata >= 3 and has_bytes:
            size = min(head[_RUN_EMULATION_INSN_SIZE], 15)
            start = _RUN_EMULATION_INSN_BYTES
            result.insn_bytes = bytes(head[start : start + size])
    elif reason == KVM_EXIT_MMIO:
        (length,) = unpack("<I", head, _RUN_MMIO_LEN)
        data = int.from_bytes(head[_RUN_MMIO_DATA : _RUN_MMIO_DATA + min(length, 8)], "little")
        result.mmio = {
            "phys_addr": unpack("<Q", head, _RUN_MMIO_ADDR)[0],
            "data": data,
            "len": length,
            "is_write": bool(head[_RUN_MMIO_WRITE]),
        }


class _Kit:
    """The guest memory and buffers a session's operations point into, and
    the operation arrays built over them.  A cached guest's kit is kept for
    its next session, so a warm check maps, builds and allocates nothing;
    whatever KVM, a run or the guest writes is reset when a session takes
    it.  The caller turns a failed mapping into the guest-memory step."""

    def __init__(self, guest: _Guest) -> None:
        import ctypes
        import mmap

        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        self.mem = mmap.mmap(-1, guest.mem_size, flags)
        anchor = ctypes.c_char.from_buffer(self.mem)
        self.mem_addr = ctypes.addressof(anchor)
        del anchor  # the mapping stays; the export must go before close()
        # What reset() copies in, as buffer copies rather than foreign calls
        # (each of those is a libffi round trip): the image, a blank state
        # and outcome.  A kept kit's image spans its whole memory, zeros
        # after the code, so the copy also wipes what the last guest wrote.
        # A kit that is not kept is reset once, on its fresh mapping (zeros).
        self.page = guest.image.ljust(guest.mem_size, b"\0") if guest.pooled else guest.image
        abi = _abi()
        self.pooled = guest.pooled
        self.state, self.out = abi.State(), abi.Outcome()
        self.state.fds[:] = [-1] * _FD_SLOTS
        self.blank_state, self.blank_out = bytes(self.state), bytes(self.out)
        self.state_bytes = memoryview(self.state).cast("B")
        self.out_bytes = memoryview(self.out).cast("B")
        self.region = abi.KvmUserspaceMemoryRegion(
            slot=0,
            flags=0,
            guest_phys_addr=guest.base,
            memory_size=guest.mem_size,
            userspace_addr=self.mem_addr,
        )
        self.sregs = abi.KvmSregs()
        self.regs = abi.KvmRegs()  # what KVM_GET_REGS reads back
        self.blocks: dict[tuple[tuple[str, int], ...], Any] = {}  # what KVM_SET_REGS writes
        # Each kept array: the array, its count, its runs' indices, the
        # array as 64-bit words and the words of its runs' cookies.
        self.arrays: dict[Hashable, tuple[Any, int, tuple[int, ...], Any, tuple[int, ...]]] = {}
        self.releasers: dict[str, Callable[[], None]] = {}
        # The buffers of one architecture's plans (None on the other).
        self.vcpu_init: Any = None
        self.pc: Any = None
        self.x0: Any = None
        self.set_pc: Any = None
        self.get_x0: Any = None
        self.cpuid: Any = None
        self.msr_list: Any = None
        self.feature_list: Any = None
        self.boot_msrs: Any = None
        self.arch_msrs: Any = None
        if guest.arch == "aarch64":
            # struct kvm_vcpu_init: KVM_ARM_PREFERRED_TARGET fills it and
            # KVM_ARM_VCPU_INIT reads it unchanged.  struct kvm_one_reg: id, addr.
            self.vcpu_init = (ctypes.c_uint8 * 32)()
            self.pc = ctypes.c_uint64(guest.entry)
            self.x0 = ctypes.c_uint64(0)
            self.set_pc = (ctypes.c_uint64 * 2)(ARM64_REG_PC, ctypes.addressof(self.pc))
            self.get_x0 = (ctypes.c_uint64 * 2)(ARM64_REG_X0, ctypes.addressof(self.x0))
        if guest.long_mode:
            self.cpuid = abi.KvmCpuid2()
            self.msr_list, self.feature_list = abi.KvmMsrList(), abi.KvmMsrList()
            self.boot_msrs = abi.KvmMsrs(nmsrs=len(BOOT_MSRS))
            for entry, (_, index, value) in zip(self.boot_msrs.entries, BOOT_MSRS):
                entry.index, entry.data = index, value
            self.arch_msrs = abi.KvmMsrs(nmsrs=1)
            self.arch_msrs.entries[0].index = MSR_IA32_ARCH_CAPABILITIES

    def reset(self, fd: int) -> None:
        """Ready for a session on ``fd``: the guest memory as a fresh mapping
        holding the guest's image, the buffers as the plans expect them."""
        import ctypes

        self.mem[: len(self.page)] = self.page
        self.state_bytes[:] = self.blank_state
        self.out_bytes[:] = self.blank_out
        self.state.fds[0] = fd
        if self.cpuid is not None:  # the counts KVM shrinks to what it filled
            self.cpuid.nent = _MAX_CPUID_ENTRIES
            self.msr_list.nmsrs = self.feature_list.nmsrs = _MAX_MSR_INDICES
            self.arch_msrs.entries[0].data = 0
        if self.vcpu_init is not None:
            ctypes.memset(self.vcpu_init, 0, ctypes.sizeof(self.vcpu_init))
            self.x0.value = 0

    def releaser(self, backend: Any) -> Callable[[], None]:
        release = self.releasers.get(backend.name)
        if release is None:
            release = self.releasers[backend.name] = backend.releaser(self.state)
        return release

    def block(self, values: dict[str, int]) -> Any:
        """A kvm_regs holding ``values``, the same one for the same values."""
        key = tuple(values.items())
        block = self.blocks.get(key)
        if block is None:
            block = self.blocks[key] = _abi().KvmRegs(**values)
        return block

    def array(
        self, plan: _Plan | Callable[[], _Plan], key: Hashable = None
    ) -> tuple[Any, int, tuple[int, ...]]:
        """The plan as an operation array, its count and the indices of its
        runs: built once per plan in a kept kit (its operations point only
        into the kit's own buffers).  ``plan`` may be the function that
        makes it, and ``key`` then names everything it depends on beyond
        the kit and its guest: a kept kit does not even make it again."""
        if key is None:
            assert isinstance(plan, _Plan)
            key = tuple(plan.ops)
        built = self.arrays.get(key) if self.pooled else None
        if built is None:
            made = plan if isinstance(plan, _Plan) else plan()
            runs = tuple(i for i, op in enumerate(made.ops) if op[1] == _OP_RUN)
            ops, count = made.build()
            # The runs' cookie fields as 64-bit words of the array: a word
            # is written in place, where ops[i].src = ... would make a
            # structure to write through.
            words = memoryview(ops).cast("B").cast("Q")
            built = (ops, count, runs, words, tuple(i * _OP_WORDS + _OP_SRC_WORD for i in runs))
            if self.pooled and len(self.arrays) < _KIT_ARRAYS:
                self.arrays[key] = built
        # Each run gets a cookie of its own, so that a timer signal of an
        # earlier run can never end a later one.
        words, counter = built[3], _cached("cookie", _cookie_counter)
        for at in built[4]:
            words[at] = next(counter) & _COOKIE_MASK
        return built[:3]


_KIT_ARRAYS = 32  # operation arrays a kit keeps (a gate builds about 8)
_KITS_KEPT = 4  # kits kept per guest (one per thread checking at once)


def _take_kit(guest: _Guest) -> _Kit:
    kits: dict[int, list[_Kit]] = _cached("kits", dict)
    try:
        return kits.get(id(guest), []).pop()  # atomic: no two sessions share one
    except IndexError:
        kit: _Kit = _as_step(STEP_GUEST_MEMORY, _Kit, guest)
        return kit


def _give_back(guest: _Guest, kit: _Kit) -> None:
    """Keep a kit for the guest's next session (cached guests only); one
    not kept has its guest memory unmapped now."""
    if kit.pooled:
        kept = _cached("kits", dict).setdefault(id(guest), [])
        if len(kept) < _KITS_KEPT:
            kept.append(kit)
            return
    kit.mem.close()


class _Session:
    """One throwaway VM: guest memory, the buffers the operations point into."""

    # Slots: a session has more attributes than an instance keeps without a
    # dict of its own, and one is made for every check.
    __slots__ = tuple(
        "arch_msrs backend boot_msrs cpuid feature_list get_x0 guest handed kit mem mem_addr "
        "msr_list out pc region regs release result run_indices set_pc signo spans sregs "
        "started startup state timeout_ns vcpu_init wanted x0".split()
    )

    def __init__(
        self, fd: int, guest: _Guest, backend: Any, result: SmokeResult, timeout_ns: int
    ) -> None:
        self.guest, self.backend, self.result = guest, backend, result
        self.timeout_ns = timeout_ns
        self.signo = _timer_signal()
        # The guest memory and every buffer whose address goes into an
        # operation are held by the kit until the session closes.
        kit = self.kit = _take_kit(guest)
        kit.reset(fd)
        self.mem, self.mem_addr = kit.mem, kit.mem_addr
        self.run_indices: tuple[int, ...] = ()  # of the array run last
        self.state, self.out, self.region = kit.state, kit.out, kit.region
        self.sregs, self.regs = kit.sregs, kit.regs
        self.release = kit.releaser(backend)
        self.handed: _RunArea | None = None  # the run area, once given to the releasing thread
        self.startup: _Startup | None = None  # the gate's start-up ioctls, made in its first array
        self.started: Any = None  # their VMs, in a state of their own once taken
        self.wanted, self.spans = guest.wanted()
        self.vcpu_init, self.pc, self.x0 = kit.vcpu_init, kit.pc, kit.x0
        self.set_pc, self.get_x0 = kit.set_pc, kit.get_x0
        self.cpuid, self.msr_list, self.feature_list = kit.cpuid, kit.msr_list, kit.feature_list
        self.boot_msrs, self.arch_msrs = kit.boot_msrs, kit.arch_msrs

    def addr(self, obj: Any) -> int:
        import ctypes

        return ctypes.addressof(obj)

    def execute(self, plan: _Plan | Callable[[], _Plan], key: Hashable = None) -> bool:
        """Run a plan (see _Kit.array for ``key``); record a failure in the
        result; return whether all ran."""
        ops, count, self.run_indices = self.kit.array(plan, key)
        self.backend.execute(ops, count, self.state, self.out)
        self.result.runs = self.out.runs
        self.result.bound = BOUND_NAMES.get(self.out.bound, self.result.bound)
        self.result.requeued = self.out.requeued
        if self.out.step >= 0:
            self.result.step, self.result.error = self.out.step, self.out.error
            self.result.timed_out = bool(self.out.timed_out)
            if self.out.step == STEP_API_VERSION:
                self.result.api_version = self.out.values[_V_API]
            return False
        return True

    def key(self, name: str, *depends: Hashable) -> Hashable:
        """The key of a plan that depends only on the kit and its guest,
        the bound, and ``depends`` (see _Kit.array)."""
        return (name, self.timeout_ns, self.signo, *depends)

    @property
    def warm_up_at(self) -> int:
        """The index of the warm-up's first operation in the array just run
        (the vCPU's): its KVM_SET_REGS, just before its first run."""
        return self.run_indices[0] - 1

    def run_plan(self, plan: _Plan, rip: int, value: int, **regs: int) -> None:
        """Append: set the registers, then run the vCPU once, bounded.

        Each run gets its own register block: the operations only point at
        it, and every block must still hold its values when the plan runs.
        """
        block = self.kit.block({**self.guest.regs, "rip": rip, **regs})
        plan.ioctl(STEP_SET_REGS, _VCPU, KVM_SET_REGS, self.addr(block))
        plan.run(self.timeout_ns, self.signo, value)


def _setup_plan(session: _Session) -> _Plan:
    """Create the VM, its memory and vCPU; long mode reads the CPUID too."""
    plan = _Plan()
    plan.ioctl(
        STEP_API_VERSION,
        _KVM,
        KVM_GET_API_VERSION,
        value=_V_API,
        check=_CHECK_EQ,
        expect=KVM_API_VERSION,
    )
    plan.ioctl(STEP_CREATE_VM, _KVM, KVM_CREATE_VM, 0, fd_out=_VM)
    plan.ioctl(STEP_MEMORY_REGION, _VM, KVM_SET_USER_MEMORY_REGION, session.addr(session.region))
    plan.ioctl(STEP_CREATE_VCPU, _VM, KVM_CREATE_VCPU, 0, fd_out=_VCPU)
    if session.guest.long_mode:
        plan.ioctl(STEP_GET_CPUID, _KVM, KVM_GET_SUPPORTED_CPUID, session.addr(session.cpuid))
    return plan


def _run_area_plan(plan: _Plan) -> None:
    size, run = STEP_RUN_AREA_SIZE, _SIZEOF_KVM_RUN_MIN
    plan.ioctl(size, _KVM, KVM_GET_VCPU_MMAP_SIZE, value=_V_RUN_SIZE, check=_CHECK_GE, expect=run)
    plan.map_run(STEP_MAP_RUN_AREA)


def _vcpu_plan(session: _Session) -> _Plan:
    """Give the vCPU its CPUID, mode and MSRs, and map its run area."""
    plan = _Plan()
    if session.guest.long_mode:
        plan.ioctl(STEP_SET_CPUID, _VCPU, KVM_SET_CPUID2, session.addr(session.cpuid))
    plan.ioctl(STEP_GET_SREGS, _VCPU, KVM_GET_SREGS, session.addr(session.sregs))
    for offset, size in session.spans:
        plan.copy(
            STEP_SET_SREGS,
            session.addr(session.sregs) + offset,
            session.addr(session.wanted) + offset,
            size,
        )
    plan.ioctl(STEP_SET_SREGS, _VCPU, KVM_SET_SREGS, session.addr(session.sregs))
    _run_area_plan(plan)
    if session.guest.long_mode:
        msrs = STEP_SET_MSRS
        plan.ioctl(msrs, _VCPU, KVM_SET_MSRS, session.addr(session.boot_msrs), value=_V_BOOT_MSRS)
        lists = (
            (KVM_GET_MSR_INDEX_LIST, session.msr_list, _V_MSR_LIST),
            (
                KVM_GET_MSR_FEATURE_INDEX_LIST,
                session.feature_list,
                _V_FEATURE_LIST,
            ),
        )
        for request, buffer, slot in lists:
            plan.ioctl(msrs, _KVM, request, session.addr(buffer), value=slot, soft=True)
        # What QEMU does with -cpu host when CPUID offers ARCH_CAPABILITIES:
        # read the feature MSR, set it.  Made in any case, soft, so the
        # array need not wait for the CPUID answer; _read_msrs reports them
        # only when the CPUID offers the MSR.
        arch = session.addr(session.arch_msrs)
        plan.ioctl(msrs, _KVM, KVM_GET_MSRS, arch, value=_V_ARCH_GET, soft=True)
        plan.ioctl(msrs, _VCPU, KVM_SET_MSRS, arch, value=_V_ARCH_SET, soft=True)
    return plan


def _read_cpuid(session: _Session) -> None:
    """Note the CPUID_FEATURES the long-mode guest will find in its CPUID."""
    import ctypes

    count = min(session.cpuid.nent, _MAX_CPUID_ENTRIES)
    raw = ctypes.string_at(ctypes.addressof(session.cpuid.entries), count * _CPUID_ENTRY_SIZE)
    session.result.cpuid = _cpuid_features(raw)


def _cpuid_features(raw: bytes) -> dict[str, bool]:
    """Which CPUID_FEATURES the entries in ``raw`` (kvm_cpuid_entry2s) show.

    Each leaf's first entry at index 0 is found by a byte search for its
    (function, index) pair at an entry's start, not by a loop over the
    entries.  Nothing is cached: KVM's answer is not the same on every
    call (leaf 1's EBX and leaf 0xB's EDX hold the APIC ID of the CPU the
    caller runs on), and the search costs less than a comparison of the
    whole answer with one kept."""
    words = memoryview(raw).cast("I")  # each entry is ten 32-bit words
    found = {}
    for feature, (at_start, register, bit) in _CPUID_SEARCH.items():
        at = raw.find(at_start)
        while at > 0 and at % _CPUID_ENTRY_SIZE:  # inside an entry: search on
            at = raw.find(at_start, at + 1)
        found[feature] = at >= 0 and bool(words[at // 4 + register] >> bit & 1)
    return found


# struct kvm_cpuid_entry2: function, index, flags, eax, ebx, ecx, edx, padding[3].
_CPUID_ENTRY_SIZE = 40
_CPUID_REGISTERS = {"eax": 3, "ebx": 4, "ecx": 5, "edx": 6}  # word offsets
#: Each feature: the bytes an entry of its leaf at index 0 starts with, the
#: word offset of its register, and its bit.
_CPUID_SEARCH = {
    feature: (leaf.to_bytes(4, "little") + bytes(4), _CPUID_REGISTERS[register], bit)
    for feature, (leaf, register, bit) in CPUID_FEATURES.items()
}


def _read_msrs(session: _Session) -> None:
    values = session.out.values
    set_count = int(values[_V_BOOT_MSRS])
    refused = BOOT_MSRS[set_count][0] if set_count < len(BOOT_MSRS) else None
    msrs: dict[str, Any] = {
        "boot_msrs_set": set_count,
        "boot_msrs": len(BOOT_MSRS),
        "boot_msr_refused": refused,
        "msr_index_list": int(values[_V_MSR_LIST]) >= 0,
    }
    if session.result.cpuid.get("arch_capabilities"):
        count = min(session.feature_list.nmsrs, _MAX_MSR_INDICES)
        features = session.feature_list.indices[:count]  # one list, not a lookup per index
        got, put = int(values[_V_ARCH_GET]), int(values[_V_ARCH_SET])
        listed = MSR_IA32_ARCH_CAPABILITIES in features if values[_V_FEATURE_LIST] >= 0 else None
        msrs["arch_capabilities"] = {
            "offered_by_cpuid": True,
            "feature_msr": listed,
            "value": f"{session.arch_msrs.entries[0].data:#x}" if got == 1 else None,
            "read": errno.errorcode.get(-got, got) if got < 0 else got == 1,
            "accepted": put == 1,
        }
    session.result.msrs = msrs


def _read_guest(session: _Session) -> None:
    """Decode a guest run: exit, registers, and the instruction it stopped at."""
    import ctypes

    result = session.result
    _decode_run(result, bytes(session.out.run_head))
    result.proof = int(session.regs.rax) & 0xFFFFFFFF
    result.rip = int(session.regs.rip)
    result.stage = int(session.regs.r15)
    if session.guest.long_mode:
        area = ctypes.string_at(session.mem_addr + session.guest.cx16_area, 16)
        result.cx16_value = int.from_bytes(area, "little")
        if not (result.exit_reason == KVM_EXIT_HLT and result.stage == _STAGE_PASSED):
            where = session.guest.marks.get(result.rip) or STAGES.get(result.stage)
            result.instruction = where or "entering 64-bit mode"


def _measure_speed(session: _Session) -> bool | None:
    """Time the guest loop.  None: the smoke test ends here (the guest did
    not halt, or a run failed); True: the final run was made as well, in
    the first sample's array; False: the final run is still to make.

    Each KVM_RUN costs a fixed entry and exit (hundreds of microseconds when
    KVM itself runs under an emulator), so the loop's cost is the slope
    between a 1-iteration run and a longer one, never one run alone.  The
    longer run grows until its loop time dominates: on an emulating host the
    short one already does, so the probe stays within a few milliseconds.

    Noise only ever adds time, and a stall inside the short run (the host
    of an emulated KVM descheduling it, an interrupt that costs the run one
    more exit and entry) is divided by its 1,023 iterations, not by the long
    run's 131,071: one stalled sample can look emulated.  So "emulated"
    needs two samples that agree (within _SPEED_AGREE of each other), the
    faster kept, and each sample's short run has twice the iterations of
    the one before: emulation costs the same per iteration at any length,
    while a stall, a fixed time, is spread over twice as many (two stalls
    of one size agree with each other; at two lengths they do not).  After
    a slow sample the short run is made twice and the faster counts, as
    the other runs are: one stall twice the size of the first can no
    longer agree with it.  Any sample under the threshold passes at once;
    after _SPEED_TRIES samples the fastest one decides.  It starts from
    the warm-up run (_warm_up), which faulted the pages in.
    """
    result = session.result
    _decode_run(result, bytes(session.out.run_head))  # the warm-up run, just made
    if result.exit_reason != KVM_EXIT_HLT:
        _read_guest(session)
        return None
    host_ns, note = _host_ns_per_iteration(1 << 16)
    samples: list[tuple[float, int]] = []
    implausible: tuple[float, int] | None = None
    final: bool | None = None
    for attempt in range(_SPEED_TRIES):
        sampled = _guest_slope(session, attempt, host_ns)
        if sampled is None:
            return None
        measured, final = sampled
        if final is not None or host_ns is None:
            # The array found this sample decides (see _slope_plan), or
            # there is nothing to compare with: one sample is what is said.
            samples.append(measured)
            break
        if measured[0] < _IMPLAUSIBLE_RATIO * host_ns:
            implausible = measured  # faster than the host CPU itself: noise
            continue
        samples.append(measured)
        samples.sort()
        if samples[0][0] < EMULATION_RATIO * host_ns:
            break
        if len(samples) > 1 and samples[1][0] <= _SPEED_AGREE * samples[0][0]:
            break
    if not samples:
        assert implausible is not None
        why = (
            "the measurements were inconsistent (a guest loop faster than the host CPU); "
            "no verdict is drawn from them"
        )
        result.speed = Speed(implausible[0], None, implausible[1], why)
    else:
        result.speed = Speed(samples[0][0], host_ns, samples[0][1], note)
    result.exit_reason = -1
    if final is False:
        return None  # the final run failed: the result holds its step and error
    return bool(final)


def _warm_up(session: _Session, plan: _Plan) -> _Plan:
    """Append the speed probe's first run (one iteration, which faults the
    guest's pages in) and the registers it ended with."""
    session.run_plan(plan, session.guest.loop, _V_T_WARM, rcx=1)
    plan.ioctl(STEP_GET_REGS, _VCPU, KVM_GET_REGS, session.addr(session.regs))
    return plan


# The speed probe's runs of the guest loop: (value slot of the time, iterations).
_SLOPE_LONG = ((_V_T_LONG, _SPEED_LONG), (_V_T_LONG2, _SPEED_LONG))
_INT64_MAX = (1 << 63) - 1


def _runs(session: _Session, runs: tuple[tuple[int, int], ...]) -> _Plan:
    """Runs of the guest loop, each bounded, each timed into its slot."""
    plan = _Plan()
    for slot, iterations in runs:
        session.run_plan(plan, session.guest.loop, slot, rcx=iterations)
    return plan


def _slope_runs(short: int, twice: bool) -> tuple[tuple[int, int], ...]:
    """A sample's runs before the long ones: two of 1 iteration, and the
    short one (twice after the first sample: see _measure_speed)."""
    runs = ((_V_T_BASE, 1), (_V_T_BASE2, 1), (_V_T_SHORT, short))
    return runs + (((_V_T_SHORT2, short),) if twice else ())


def _slope_plan(session: _Session, short: int, twice: bool, deciding: bool) -> _Plan:
    """One sample as one array.  Its short runs; then, while their loop time
    is still within the noise of entry and exit, the two long ones (an
    OP_UNLESS ends the array otherwise); with ``deciding`` (the first
    sample), then the final run and its registers, while the sample is one
    that ends the probe (_V_LONG_LO and _V_LONG_HI bound its loop time)."""
    plan = _runs(session, _slope_runs(short, twice))
    shorts = (_V_T_SHORT, _V_T_SHORT2 if twice else _V_T_SHORT)
    plan.unless(STEP_RUN, (*shorts, _V_T_BASE, _V_T_BASE2, _V_SHORT_LO, _V_SHORT_HI))
    plan.ops += _runs(session, _SLOPE_LONG).ops
    if deciding:
        plan.unless(
            STEP_RUN, (_V_T_LONG, _V_T_LONG2, _V_T_BASE, _V_T_BASE2, _V_LONG_LO, _V_LONG_HI)
        )
        plan.ops += _final_plan(session).ops
    return plan


def _deciding_bounds(host_ns: float | None) -> tuple[int, int]:
    """The long runs' loop time (ns, over _SPEED_LONG - 1 iterations) of a
    first sample that ends the probe, as [lo, hi): one neither faster than
    the host CPU can be nor slow enough to need a second sample (see
    _measure_speed).  With no host figure, any sample ends it."""
    if host_ns is None:
        return 0, _INT64_MAX
    per_run = host_ns * (_SPEED_LONG - 1)
    return _ceil(_IMPLAUSIBLE_RATIO * per_run), _ceil(EMULATION_RATIO * per_run)


def _ceil(ns: float) -> int:
    """The least whole ns at or above ``ns`` (not negative), at most INT64_MAX:
    a whole time is at or above ``ns`` exactly when it is at or above this."""
    if not ns < _INT64_MAX:
        return _INT64_MAX
    whole = max(int(ns), 0)
    return whole + (whole < ns)


def _guest_slope(
    session: _Session, attempt: int, host_ns: float | None
) -> tuple[tuple[float, int], bool | None] | None:
    """Sample ``attempt`` (from 0), as one array (_slope_plan): None on a
    failure before the final run; else (ns per loop iteration, iterations
    of the longer run) and whether the final run was made (None: not, True:
    made, False: made and failed).  The first sample's array goes on to
    the final run when that sample ends the probe."""
    short, twice, deciding = _SPEED_SHORT << attempt, attempt > 0, attempt == 0
    values, out = session.out.values, session.out
    for slot in (_V_T_BASE, _V_T_BASE2, _V_T_SHORT, _V_T_SHORT2, _V_T_LONG, _V_T_LONG2):
        values[slot] = 0  # run times add up across resumed runs
    values[_V_SHORT_LO], values[_V_SHORT_HI] = 0, _SPEED_SLOW_NS
    values[_V_LONG_LO], values[_V_LONG_HI] = _deciding_bounds(host_ns) if deciding else (0, 0)
    ran = session.execute(
        lambda: _slope_plan(session, short, twice, deciding),
        session.key("slope", short, twice, deciding),
    )
    # Where the array ended: its runs' indices tell its parts apart (the
    # first long run follows the 3 or 4 short-part ones; the final run, with
    # its KVM_SET_REGS just before it, is the last).
    at, longs = out.op_index, session.run_indices[3 + twice]
    if not ran and (not deciding or at < session.run_indices[-1] - 1):
        return None
    # Noise only ever adds time: the minimum of two runs of each size (of
    # the short one after a slow sample, see _measure_speed).
    base = min(int(values[_V_T_BASE]), int(values[_V_T_BASE2]))
    short_ns = int(values[_V_T_SHORT])
    if twice:
        short_ns = min(short_ns, int(values[_V_T_SHORT2]))
    extra, iterations = short_ns - base, short
    if not (out.stopped and at < longs):  # the long runs were made
        longest = min(int(values[_V_T_LONG]), int(values[_V_T_LONG2]))
        extra, iterations = longest - base, _SPEED_LONG
    final = ran if deciding and not out.stopped else None
    return (max(extra, 1) / (iterations - 1), iterations), final


def _aarch64_plan(session: _Session) -> _Plan:
    """The whole arm64 smoke test as one array of operations."""
    plan = _setup_plan(session)
    plan.ioctl(STEP_ARM_TARGET, _VM, KVM_ARM_PREFERRED_TARGET, session.addr(session.vcpu_init))
    plan.ioctl(STEP_ARM_VCPU_INIT, _VCPU, KVM_ARM_VCPU_INIT, session.addr(session.vcpu_init))
    plan.ioctl(STEP_SET_ONE_REG, _VCPU, KVM_SET_ONE_REG, session.addr(session.set_pc))
    _run_area_plan(plan)
    plan.run(session.timeout_ns, session.signo, _V_T_GUEST)
    plan.ioctl(STEP_GET_ONE_REG, _VCPU, KVM_GET_ONE_REG, session.addr(session.get_x0))
    return plan


def _final_plan(session: _Session) -> _Plan:
    """Run the guest from its entry, bounded, and read its registers."""
    plan = _Plan()
    session.run_plan(plan, session.guest.entry, _V_T_GUEST)
    plan.ioctl(STEP_GET_REGS, _VCPU, KVM_GET_REGS, session.addr(session.regs))
    return plan


#: The long-mode guest's _setup_plan: its operations, up to and with the
#: CPUID's, come first in its array.
_LONG_SETUP_OPS = 5


def _long_mode_plan(session: _Session, startup: Sequence[str] = ()) -> _Plan:
    """The ``startup`` ioctls (_startup_ops), then the long-mode guest's VM
    and its vCPU's set-up, as one plan."""
    plan = _startup_ops(startup)
    plan.ops += _setup_plan(session).ops
    assert len(plan.ops) == _startup_count(startup) + _LONG_SETUP_OPS
    plan.ops += _vcpu_plan(session).ops
    return plan


def _trivial_plan(session: _Session) -> _Plan:
    """The whole real-mode smoke test as one array of operations."""
    plan = _setup_plan(session)
    plan.ops += _vcpu_plan(session).ops + _final_plan(session).ops
    return plan


def _run_guest(session: _Session) -> None:
    """The whole smoke test for one guest; failures land in the result.

    The real-mode and arm64 guests are one array of operations each (one
    foreign call with the native backend); the long-mode one is several,
    because what comes next depends on how fast the guest ran.
    """
    result = session.result
    if session.guest.arch == "aarch64":
        ran = session.execute(lambda: _aarch64_plan(session), session.key("whole"))
        result.api_version = int(session.out.values[_V_API])
        if ran:
            _decode_run(result, bytes(session.out.run_head))
            result.proof = int(session.x0.value) & 0xFFFFFFFF
            result.step = STEP_DONE
        return
    if not session.guest.long_mode:
        ran = session.execute(lambda: _trivial_plan(session), session.key("whole"))
        result.api_version = int(session.out.values[_V_API])
        if ran:
            _read_guest(session)
            result.step = STEP_DONE
        return
    # The gate's start-up VMs, the guest's VM, the vCPU's set-up and the
    # warm-up run: one array.  The start-up operations are all soft, so
    # their answers are read whatever came after them.
    startup = session.startup
    wanted = () if startup is None else startup.wanted
    ran = session.execute(
        lambda: _warm_up(session, _long_mode_plan(session, wanted)), session.key("vcpu", wanted)
    )
    if startup is not None:
        startup.answers = _startup_answers(wanted, session.out.values)
    failed_at = session.out.op_index
    if not ran and failed_at < _startup_count(wanted) + _LONG_SETUP_OPS:
        return  # the VM or its vCPU was not made, or KVM gave no CPUID
    result.api_version = int(session.out.values[_V_API])
    _read_cpuid(session)
    if not ran and failed_at < session.warm_up_at:
        return  # the vCPU's set-up failed
    _read_msrs(session)
    if not ran:
        return
    final = _measure_speed(session)  # None: it ended the test; True: the final run made
    if final is None:
        return
    if not final and not session.execute(lambda: _final_plan(session), session.key("final")):
        return
    _read_guest(session)
    result.step = STEP_DONE


def _check_timeout(timeout: object, name: str = "timeout", most: float = MAX_TIMEOUT) -> None:
    """Refuse a bound that is not a finite number of seconds in (0, most]."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgumentError(f"{name} must be a number of seconds, got {timeout!r}")
    if not 0 < timeout <= most:  # false for NaN and for infinity alike
        raise InvalidArgumentError(
            f"{name} must be more than 0 and at most {most:g} seconds, got {timeout!r}"
        )


def smoke_test(
    fd: int,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    backend: str | None = None,
    guest: str = "real-mode",
) -> SmokeResult:
    """Run guest code in a throwaway VM on an open /dev/kvm descriptor.

    ``guest`` is "real-mode" (the bare device check: ``mov eax; hlt``),
    "long-mode" (what a stock kernel needs: 64-bit mode, CX16, XSAVE, the
    boot MSRs, and the speed of guest code against the host CPU) or
    "aarch64".  ``backend`` is "native" (libkvmsmoke.so), "python", or None
    for the native one when it can be used.  Never raises for a KVM failure:
    the result says how far it got.  Raises InternalError when the native
    backend is asked for and cannot be used, InvalidArgumentError for a bad
    argument.
    """
    _check_timeout(timeout)
    return _run_program(fd, _guest(guest), timeout, backend)


def _run_program(
    fd: int,
    program: _Guest,
    timeout: float,
    backend: str | None,
    startup: _Startup | None = None,
) -> SmokeResult:
    """smoke_test() for any guest program (the tests run spinning ones).

    ``startup`` (the gate's start-up ioctls) is made in the long-mode
    guest's first array, its VMs just before the guest's own; its answers
    stay None when that array was never run (no session, or another guest)."""
    import time

    runner = _backend_for(backend)
    result = SmokeResult(runner.name, timeout, program.name)
    start = time.perf_counter()
    try:
        session = _Session(fd, program, runner, result, max(1, int(timeout * 1e9)))
    except _StepFailed as failed:
        result.step, result.error = failed.step, failed.error
        return result
    session.startup = startup
    _in_session(session, _run_guest)
    result.elapsed = time.perf_counter() - start
    return result


class _Startup:
    """The start-up ioctls a gate makes in its guest's first array: the
    ones wanted, in order, and their answers once made (_startup_answers)."""

    __slots__ = ("wanted", "answers")

    def __init__(self, names: tuple[str, ...]) -> None:
        self.wanted: tuple[str, ...] = _cached_in("startup-wanted", names, _startup_wanted, names)
        self.answers: dict[str, int] | None = None


def _in_session(session: _Session, work: Callable[[_Session], None]) -> None:
    """Run ``work(session)``, then release the session on every path."""
    late: BaseException | None = None
    try:
        work(session)
    finally:
        # A caller's signal handler may raise anywhere, cleanup included: a
        # release it cut short is run again (it is safe to), and what it
        # raised goes on after.
        while True:
            try:
                _release_session(session)
                break
            except BaseException as err:
                late = err
        _give_back(session.guest, session.kit)
        if late is not None:
            raise late


_MADV_DONTFORK = 10  # include/uapi/asm-generic/mman-common.h
_TEARDOWN_BACKLOG = 4  # releases waiting on the thread before a VM is torn down here


def _release_session(session: _Session) -> None:
    """Close the session's descriptors now, and leave the VM's teardown to
    the releasing thread: the vCPU's run area still holds the vCPU, and
    through it the VM, so the thread's munmap of it is the last release and
    bears the teardown (0.4 ms on this host, more in a nested one), which
    the caller need not wait for.  The area is kept out of forked children
    (MADV_DONTFORK): a child's copy would keep the VM alive as long as the
    child.  The teardown happens here when no thread takes it (the command
    line holds its VMs for a helper at exit instead; no thread could be
    started; a backlog already waits) or the area cannot be kept from a
    fork.

    Safe to run again when an exception cut it short: each step is one
    store, and the area is handed over as an object that unmaps it once,
    however often it was queued, so it is neither unmapped twice nor left."""
    state, area = session.state, session.handed
    if session.startup is not None:  # only its arrays make start-up VMs
        _release_startup_vms(session)
    if area is None and state.run_addr:
        releaser = _teardown_thread()
        addr, size = int(state.run_addr), int(state.run_size)
        if releaser is not None and _sys_libc().madvise(addr, size, _MADV_DONTFORK) == 0:
            session.handed = area = _RunArea(addr, size)
    if area is not None:
        state.run_addr = 0  # from here on the area is the thread's
        state.run_size = 0
        if not area.queued:
            _CACHE["releaser"].put(area)
            area.queued = True
    session.release()


def _release_startup_vms(session: _Session) -> None:
    """Hand the session's start-up VMs to _release_later in a state of their
    own, released by the backend as the standalone probe's are: they hold
    no vCPU, so the last close of each bears its teardown (an irqchip and a
    PIT: the longest of all).  Safe to run again, as _release_session is:
    the backends' release of a state is."""
    state, vms = session.state, session.started
    if vms is None:
        fds = (int(state.fds[_STARTUP_VM]), int(state.fds[_SPLIT_VM]))
        if max(fds) < 0:
            return
        vms = _abi().State()
        vms.fds[:] = [-1] * _FD_SLOTS
        vms.fds[_STARTUP_VM], vms.fds[_SPLIT_VM] = fds
        session.started = vms
    state.fds[_STARTUP_VM] = state.fds[_SPLIT_VM] = -1  # from here on they are its
    _release_later(session.backend.releaser(vms), [int(fd) for fd in vms.fds[1:]])


def _teardown_thread() -> _Releases | None:
    """The releasing thread, when a VM's teardown may be left to it: not
    in the command line (its VMs go to a helper at exit), not when no
    thread could be started, not past a backlog."""
    if "held-for-exit" in _CACHE:
        return None
    releaser: _Releases | None = _cached("releaser", _start_releaser)
    if releaser is None or releaser.unfinished >= _TEARDOWN_BACKLOG:
        return None
    return releaser


class _RunArea:
    """A vCPU's run area for the releasing thread to unmap, once."""

    def __init__(self, addr: int, size: int) -> None:
        self.addr, self.size = addr, size
        self.queued = self.unmapped = False

    def __call__(self) -> None:
        if self.unmapped:  # queued again by a release an exception cut short
            return
        self.unmapped = True
        if _sys_libc().munmap(self.addr, self.size) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, f"munmap of a vCPU's run area: {os.strerror(err)}")


# ── Evidence: what the host shows, read once ────────────────────────────────

# POSIX ACL xattr entries (include/uapi/linux/posix_acl.h, posix_acl_xattr.h).
_ACL_TAGS = {0x01: "user_obj", 0x02: "user", 0x04: "group_obj", 0x08: "group"}
_ACL_TAGS.update({0x10: "mask", 0x20: "other"})


class Evidence:
    """What the host shows about reaching /dev/kvm and running guests.

    A plain value: the diagnosis is a pure function of it and of what the
    probes answered.  Each field is read from the host on first use and
    once (only error paths and the report read most of them), by the
    function of that name in _GATHER; tests give the values directly with
    ``gather=False``, and then an unset field is None.  A field that cannot
    be read is None, never an exception.
    """

    path: str
    # Who: effective ids, every group, the user's name.
    euid: int | None
    groups: tuple[int, ...]
    user: str | None
    # The node: {kind, major, minor, uid, gid, mode, owner, group}, its
    # ACL, the mount that holds it, and whether it is a mount of its own.
    node: dict[str, Any] | None
    acl: list[dict[str, Any]] | None
    mount: dict[str, Any] | None
    bind_mounted: bool | None
    # The group database: the user is listed in the node's group; that
    # group has a name; a group called "kvm" exists.
    group_listed: bool | None
    group_named: bool | None
    kvm_group: bool | None
    # Where: user namespace maps, runtime or sandbox, cgroups, /dev.
    userns: dict[str, Any] | None
    runtime: str | None
    runtime_evidence: list[str]
    private_dev: bool | None
    cgroup: dict[str, Any] | None
    systemd_unit: str | None
    wsl: str | None
    snap: str | None
    # Sandboxing: NoNewPrivs, seccomp mode, Landlock ABI, LSMs.
    no_new_privs: bool | None
    seccomp: str | None
    landlock_abi: int | None
    lsm: list[str] | None
    lsm_context: str | None
    # Hardware and kernel.
    arch: str | None
    cpu_flags: set[str] | None
    vendor: str | None
    kernel: str | None
    kvm_modules: list[str]
    kvm_registered: bool | None
    kvm_provider: str | None
    module_available: dict[str, bool]
    pvm_native: str | None
    # Limits.
    rlimit_nofile: tuple[int, int] | None
    file_max: str | None

    def __init__(self, path: str = KVM_DEVICE, *, gather: bool = True, **values: Any) -> None:
        if values:
            unknown = set(values).difference(_GATHER)
            if unknown:
                raise TypeError(f"Evidence has no field {', '.join(sorted(unknown))}")
            self.__dict__.update(values)
        self.path = path
        self._gather = gather
        self._once: dict[tuple[Any, ...], Any] = {}  # Evidence.once's reads

    def __getattr__(self, name: str) -> Any:
        gather = _GATHER.get(name)
        if gather is None:
            raise AttributeError(name)
        value = _EMPTY.get(name)
        if self._gather:
            try:
                value = gather(self)
            except (ImportError, _SysError) as err:  # a limit the check itself hit
                _log("debug", "evidence %s unreadable: %s", name, err)
            except OSError as err:
                _errno_of(err)
                _log("debug", "evidence %s unreadable: %s", name, err)
        self.__dict__[name] = value
        return value

    def once(self, read: Callable[..., _T], *args: Any) -> _T:
        """``read(*args)``, asked of the host once for this evidence: several
        fields read the same file (the cgroups, the mounts, the status)."""
        key = (read, *args)
        if key not in self._once:
            self._once[key] = read(*args)
        value: _T = self._once[key]
        return value

    def as_dict(self) -> dict[str, object]:
        out = {name: getattr(self, name) for name in _GATHER}
        out["cpu_flags"] = sorted({"vmx", "svm", "hypervisor"} & (self.cpu_flags or set()))
        out["groups"] = list(self.groups)
        return out

    def __repr__(self) -> str:
        return f"<Evidence {self.path}: node {self.node}, runtime {self.runtime}>"

    # Questions the rules ask.
    @property
    def in_userns(self) -> bool:
        return self.userns is not None and not self.userns.get("identity", True)

    def is_kvm_node(self) -> bool:
        node = self.node or {}
        numbers = (node.get("major"), node.get("minor"))
        return node.get("kind") == "character device" and numbers == (10, 232)

    def unmapped(self, which: str) -> bool:
        """Whether the node's owner ("uid") or group ("gid") is not mapped
        into this user namespace: it shows as the overflow id, which then
        matches nothing, not even a process whose own id shows the same."""
        return self.in_userns and (self.node or {}).get(which) == _OVERFLOW_ID


# What an unset field is when nothing is gathered.
_EMPTY: dict[str, Any] = {
    "groups": (),
    "runtime_evidence": [],
    "kvm_modules": [],
    "module_available": {},
}


def _ev_node(ev: Evidence) -> dict[str, Any] | None:
    import stat

    try:
        st = _stat(ev.path)
    except OSError as err:
        _errno_of(err)
        return None
    device = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
    kinds = (
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISREG, "regular file"),
    )
    kind = next((name for test, name in kinds if test(st.st_mode)), "special file")
    group = ev.once(_group_entry, st.st_gid)
    return {
        "kind": kind,
        "major": os.major(st.st_rdev) if device else None,
        "minor": os.minor(st.st_rdev) if device else None,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mode": stat.S_IMODE(st.st_mode),
        "owner": ev.once(_user_name, st.st_uid),
        "group": group[0] if group else None,
    }


def _ev_acl(ev: Evidence) -> list[dict[str, Any]] | None:
    """system.posix_acl_access: version (u32), then (tag u16, perm u16, id u32)."""
    raw = _getxattr(ev.path, "system.posix_acl_access")
    if not raw or len(raw) < 4:
        return None
    entries = []
    for at in range(4, len(raw) - 7, 8):
        tag = int.from_bytes(raw[at : at + 2], "little")
        perm = int.from_bytes(raw[at + 2 : at + 4], "little")
        ident = int.from_bytes(raw[at + 4 : at + 8], "little")
        named = _ACL_TAGS.get(tag, str(tag))
        entries.append(
            {"tag": named, "perm": perm, "id": ident if named in ("user", "group") else None}
        )
    return entries


def _mounts() -> list[dict[str, Any]]:
    """This mount namespace's mounts, from /proc/self/mountinfo, in order
    (Evidence.once: several fields look mounts up)."""
    found = []
    for line in (_read_text("/proc/self/mountinfo", 1 << 20) or "").splitlines():
        head, _, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) < 6 or len(rest) < 2:
            continue
        point = fields[4].replace("\\040", " ")
        found.append(
            {
                "point": point,
                "root": fields[3].replace("\\040", " "),
                "options": fields[5].split(","),
                "fstype": rest[0],
                "source": rest[1],
            }
        )
    return found


def _mount_of(ev: Evidence, path: str) -> dict[str, Any] | None:
    """The mount holding ``path`` (the last one mounted over it wins)."""
    best: dict[str, Any] | None = None
    for mount in ev.once(_mounts):
        point = mount["point"]
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best["point"])):
            best = mount
    return best


def _ev_mount(ev: Evidence) -> dict[str, Any] | None:
    return _mount_of(ev, ev.path)


def _ev_bind_mounted(ev: Evidence) -> bool | None:
    """Whether something is mounted on the path itself (``mount --bind X /dev/kvm``)."""
    mount = ev.mount
    return None if mount is None else mount["point"] == ev.path


def _ev_user(ev: Evidence) -> str | None:
    return ev.once(_user_name, ev.euid) if ev.euid is not None else None


def _ev_group_listed(ev: Evidence) -> bool | None:
    """Whether the group database lists this user in the node's group."""
    import pwd

    node = ev.node
    if node is None or ev.euid is None or ev.unmapped("gid"):
        return None
    try:
        entry = pwd.getpwuid(ev.euid)
    except KeyError:
        return False
    group = ev.once(_group_entry, node["gid"])
    return entry.pw_gid == node["gid"] or (group is not None and entry.pw_name in group[1])


def _ev_group_named(ev: Evidence) -> bool | None:
    node = ev.node
    return None if node is None else node.get("group") is not None


def _ev_userns(ev: Evidence) -> dict[str, Any] | None:
    uid_map = _read_text("/proc/self/uid_map")
    if uid_map is None:
        return None
    gid_map = _read_text("/proc/self/gid_map") or ""
    identity = " ".join(uid_map.split()) == "0 0 4294967295"
    return {
        "identity": identity,
        "uid_map": " ".join(uid_map.split()),
        "gid_map": " ".join(gid_map.split()),
    }


def _status_field(ev: Evidence, name: str) -> str | None:
    for line in (ev.once(_read_text, "/proc/self/status") or "").splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


def _ancestors(limit: int = 16) -> list[str]:
    """The command names of this process's ancestors, nearest first."""
    names = []
    pid = os.getppid()
    for _ in range(limit):
        stat = _read_text(f"/proc/{pid}/stat") if pid > 0 else None
        if not stat or ")" not in stat:
            break
        names.append(stat[stat.index("(") + 1 : stat.rindex(")")])
        pid = int(stat[stat.rindex(")") + 2 :].split()[1])
    return names


def _cgroups(text: str | None) -> dict[str, str]:
    """/proc/PID/cgroup as {controller or "" for v2: path}."""
    found = {}
    for line in (text or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") or [""]:
                found[controller] = parts[2]
    return found


# (runtime, what shows it): each a predicate on the markers read below, in
# the order a process that matches several is named.
_RUNTIME_MARKERS: tuple[tuple[str, str, Callable[[dict[str, Any]], bool]], ...] = (
    ("kubernetes", "KUBERNETES_SERVICE_HOST in the environment", lambda m: m["kube_env"]),
    ("kubernetes", "a service-account token", lambda m: m["kube_token"]),
    ("kubernetes", "a kubepods cgroup", lambda m: "kubepods" in m["cgroups"]),
    ("flatpak", "/.flatpak-info", lambda m: m["flatpak"]),
    ("snap", "SNAP_NAME in the environment", lambda m: bool(m["snap"])),
    ("firejail", "container=firejail", lambda m: m["container"] == "firejail"),
    ("bubblewrap", "a bwrap parent process", lambda m: "bwrap" in m["ancestors"]),
    ("systemd-nspawn", "container=systemd-nspawn", lambda m: m["container"] == "systemd-nspawn"),
    ("systemd-nspawn", "a machine.slice cgroup", lambda m: "machine.slice" in m["cgroups"]),
    ("lxc", "container=lxc", lambda m: m["container"] in ("lxc", "lxc-libvirt")),
    ("podman", "/run/.containerenv", lambda m: m["containerenv"]),
    ("podman", "container=podman", lambda m: m["container"] == "podman"),
    ("podman", "a libpod cgroup", lambda m: "libpod" in m["cgroups"]),
    ("docker", "a docker cgroup", lambda m: "docker" in m["cgroups"]),
    ("docker", "/.dockerenv on an overlay root", lambda m: m["dockerenv"] and m["overlay"]),
    ("containerd", "a containerd cgroup", lambda m: "containerd" in m["cgroups"]),
    ("containerd", "container=oci", lambda m: m["container"] == "oci"),
    ("container", "a private cgroup namespace (0::/) on an overlay root", lambda m: m["cgns"]),
    ("container", "a private /dev in a device cgroup of its own", lambda m: m["oci"]),
)


def _ev_runtime(ev: Evidence) -> str | None:
    """The container runtime or sandbox, by name (runtime_evidence: what showed it)."""
    root = _mount_of(ev, "/")
    overlay = root is not None and root["fstype"] in ("overlay", "fuse-overlayfs")
    pid1 = _read_text("/proc/1/cgroup") or ""
    markers = {
        "kube_env": bool(os.environ.get("KUBERNETES_SERVICE_HOST")),
        "kube_token": _exists("/var/run/secrets/kubernetes.io/serviceaccount"),
        "cgroups": pid1 + (ev.once(_read_text, "/proc/self/cgroup") or ""),
        "flatpak": _exists("/.flatpak-info"),
        "snap": ev.snap,
        "container": os.environ.get("container", ""),
        "ancestors": _ancestors() + [(_read_text("/proc/1/comm") or "").strip()],
        "containerenv": _exists("/run/.containerenv"),
        "dockerenv": _exists("/.dockerenv"),
        "overlay": overlay,
        "cgns": overlay and pid1.strip() == "0::/",
        # runc or crun with a config of someone's: no marker but these.
        "oci": bool(ev.private_dev) and (ev.cgroup or {}).get("devices") not in (None, "/"),
    }
    seen = [(name, shown) for name, shown, holds in _RUNTIME_MARKERS if holds(markers)]
    ev.__dict__["runtime_evidence"] = [shown for _, shown in seen]
    return seen[0][0] if seen else None


def _ev_runtime_evidence(ev: Evidence) -> list[str]:
    ev.runtime  # noqa: B018 - detecting the runtime records what showed it
    shown: list[str] = ev.__dict__.get("runtime_evidence", [])
    return shown


def _ev_private_dev(ev: Evidence) -> bool | None:
    dev = _mount_of(ev, "/dev")
    return None if dev is None else dev["fstype"] == "tmpfs"


def _ev_cgroup(ev: Evidence) -> dict[str, Any] | None:
    """The device cgroup: the v1 ``devices`` path and its allowlist where
    readable, the v2 path (where a device policy is a BPF program)."""
    text = ev.once(_read_text, "/proc/self/cgroup")
    if text is None:
        return None
    paths = _cgroups(text)
    v1 = paths.get("devices")
    listing = None
    if v1 is not None:
        for root in ("/sys/fs/cgroup/devices" + v1.rstrip("/"), "/sys/fs/cgroup/devices"):
            listing = _read_text(root + "/devices.list")
            if listing is not None:
                break
    return {
        "devices": v1,
        "devices_list": listing.split("\n")[:-1] if listing else None,
        "unified": paths.get(""),
    }


def _ev_systemd_unit(ev: Evidence) -> str | None:
    """The systemd service or scope this process runs in, from its cgroups."""
    paths = _cgroups(ev.once(_read_text, "/proc/self/cgroup"))
    for key in ("", "name=systemd", "devices"):
        leaf = (paths.get(key) or "").rstrip("/").rsplit("/", 1)[-1]
        if leaf.endswith((".service", ".scope")) and not leaf.startswith("session-"):
            return leaf
    return None


def _ev_wsl(ev: Evidence) -> str | None:
    release = (ev.kernel or "").lower()
    if "microsoft-standard" in release or (ev.once(_exists, _WSL_INTEROP) and "wsl2" in release):
        return "2"
    if (ev.kernel or "").endswith("-Microsoft"):
        return "1"
    return "2" if ev.once(_exists, _WSL_INTEROP) else None


def _ev_landlock_abi(ev: Evidence) -> int | None:
    """The Landlock ABI this kernel offers, or None when it has none."""
    import ctypes

    try:
        libc = _sys_libc()
    except OSError:
        return None
    version = ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION)
    abi = libc.syscall(_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), version)
    return int(abi) if abi > 0 else None


def _ev_lsm(ev: Evidence) -> list[str] | None:
    text = _read_text("/sys/kernel/security/lsm")
    return None if text is None else [name for name in text.strip().split(",") if name]


def _ev_lsm_context(ev: Evidence) -> str | None:
    return (_read_text("/proc/self/attr/current") or "").strip("\x00\n ") or None


def _cpuinfo_field(field: str) -> str | None:
    """The first value of a /proc/cpuinfo field, or None."""
    for line in (_read_text("/proc/cpuinfo", 1 << 20) or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == field:
            return value.strip()
    return None


def _ev_cpu_flags(ev: Evidence) -> set[str] | None:
    flags = _cpuinfo_field("flags")
    return set(flags.split()) if flags is not None else None


_KVM_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm", "kvm")
_DRIVERS = _KVM_MODULES[:3]


def _ev_kvm_modules(ev: Evidence) -> list[str]:
    """KVM modules loaded now, from /sys/module (built-in ones show too)."""
    return [name for name in _KVM_MODULES if ev.once(_exists, f"/sys/module/{name}")]


def _ev_kvm_provider(ev: Evidence) -> str | None:
    """The KVM module that drives the CPU ("kvm_pvm", "kvm_intel", ...)."""
    if "kvm_modules" in ev.__dict__:  # already read, or given
        return next((m for m in ev.kvm_modules if m != "kvm"), None)
    return next((m for m in _DRIVERS if ev.once(_exists, f"/sys/module/{m}")), None)


def _ev_module_available(ev: Evidence) -> dict[str, bool]:
    """Which KVM drivers the running kernel ships (its modules.dep)."""
    deps = _read_text(f"/lib/modules/{ev.kernel}/modules.dep", 1 << 24) or ""
    return {m: f"/{m.replace('_', '-')}.ko" in deps or f"/{m}.ko" in deps for m in _DRIVERS}


def _ev_rlimit_nofile(ev: Evidence) -> tuple[int, int]:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


# The gatherer of each field, in the order as_dict() lists them.
_GATHER: dict[str, Callable[[Evidence], Any]] = {
    "euid": lambda ev: os.geteuid(),
    "groups": lambda ev: tuple(sorted({os.getegid(), *os.getgroups()})),
    "user": _ev_user,
    "node": _ev_node,
    "acl": _ev_acl,
    "mount": _ev_mount,
    "bind_mounted": _ev_bind_mounted,
    "group_listed": _ev_group_listed,
    "group_named": _ev_group_named,
    "kvm_group": lambda ev: _group_named("kvm"),
    "userns": _ev_userns,
    "runtime": _ev_runtime,
    "runtime_evidence": _ev_runtime_evidence,
    "private_dev": _ev_private_dev,
    "cgroup": _ev_cgroup,
    "systemd_unit": _ev_systemd_unit,
    "wsl": _ev_wsl,
    "snap": lambda ev: os.environ.get("SNAP_NAME"),
    "no_new_privs": lambda ev: _status_field(ev, "NoNewPrivs") == "1",
    "seccomp": lambda ev: _status_field(ev, "Seccomp"),
    "landlock_abi": _ev_landlock_abi,
    "lsm": _ev_lsm,
    "lsm_context": _ev_lsm_context,
    "arch": lambda ev: _ARCH_NAMES.get(os.uname().machine, os.uname().machine),
    "cpu_flags": _ev_cpu_flags,
    "vendor": lambda ev: _cpuinfo_field("vendor_id"),
    "kernel": lambda ev: os.uname().release,
    "kvm_modules": _ev_kvm_modules,
    # KVM registered its misc device: it initialised (on arm64, /sys/module/kvm
    # exists even when KVM gave up for want of EL2).
    "kvm_registered": lambda ev: _exists("/sys/class/misc/kvm"),
    "kvm_provider": _ev_kvm_provider,
    "module_available": _ev_module_available,
    "pvm_native": lambda ev: (
        (_read_text("/sys/module/kvm_pvm/parameters/pvm_native") or "").strip() or None
    ),
    "rlimit_nofile": _ev_rlimit_nofile,
    "file_max": lambda ev: (_read_text("/proc/sys/fs/file-max") or "").strip() or None,
}


# ── Facts: what the probes answered, with the evidence ──────────────────────


class Facts:
    """Everything the diagnosis reads, as one value.

    The probes fill it in stages (open, capabilities, start-up ioctls, the
    guest, the deep boot); the rules read only it.  ``ev`` is the host's
    Evidence; tests build both by hand.
    """

    def __init__(
        self,
        platform: str = "linux",
        machine: str = "x86_64",
        *,
        engine: str | None = DEFAULT_ENGINE,
        path: str = KVM_DEVICE,
        evidence: Evidence | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.platform = "linux" if platform.startswith("linux") else platform
        self.machine = machine
        self.arch = _ARCH_NAMES.get(machine, machine)
        self.engine = engine
        self.path = path
        self.timeout = timeout
        self.ev = evidence if evidence is not None else Evidence(path)
        #: open(2)'s errno, or None when the device opened (or was not tried).
        self.open_errno: int | None = None
        self.open_error: OSError | None = None
        #: Whether the opened device answers KVM_GET_API_VERSION with 12.
        self.speaks_kvm: bool | None = None
        #: KVM_CHECK_EXTENSION's answer per capability: its value, or -errno.
        self.caps: dict[str, int] | None = None
        #: Each start-up ioctl tried: 0 when it worked, its errno, -1 not tried.
        self.ioctls: dict[str, int] | None = None
        #: The guest run: the trivial one, the long-mode one, or arm64's.
        self.smoke: SmokeResult | None = None
        #: macOS: each sysctl's value, None when absent, or the errno's name.
        self.sysctls: dict[str, int | str | None] = {}
        #: macOS: an hv_return_t and where it came from ("process", "engine").
        self.hv: tuple[int, str] | None = None
        self.entitled: bool | None = None
        #: The engine's error message, for diagnose_create_failure.
        self.message: str | None = None
        #: Whether every stage of the gate ran (engine-error-decoded needs it).
        self.complete = False
        self.decoded: list[str] = []
        #: The deep boot: asked for, the kernel to boot (None: BoxLite's
        #: newest), its bound, and its result (a BootResult) once it ran.
        self.deep_wanted = False
        self.kernel: str | None = None
        self.deep_timeout = DEEP_TIMEOUT
        self.deep: BootResult | None = None
        #: The checker's own failure ("native-missing", "checker-failed").
        self.note: str | None = None
        #: How long each stage of the report took, by finding id.
        self.durations: dict[str, float] = {}
        #: macOS: what hv_vm_create answered when the report asked for it.
        self.probe_hvf: tuple[int, int | None] | str | None = None
        #: (failure, missing) while the rules read them (pin), else None.
        self._pinned: tuple[tuple[int, int] | None, list[str]] | None = None

    def copy(self) -> Facts:
        """A shallow copy: the stages' values are shared, never changed."""
        other = Facts.__new__(Facts)
        other.__dict__.update(self.__dict__)
        return other

    def for_engine(self, engine: str | None) -> Facts:
        other = self.copy()
        other.engine = engine
        return other

    @property
    def engine_caps(self) -> tuple[str, ...]:
        if self.engine is None:
            return ()
        caps: tuple[str, ...] = ENGINE_REQUIREMENTS[self.engine]["required"].get(self.arch, ())
        return caps

    @property
    def engine_ioctls(self) -> tuple[str, ...]:
        if self.engine is None or self.arch != "x86_64":
            return ()
        ioctls: tuple[str, ...] = ENGINE_REQUIREMENTS[self.engine]["ioctls"]
        return ioctls

    @property
    def missing(self) -> list[str]:
        """The capabilities the engine needs that KVM reports absent (0)."""
        pinned = self._pinned
        return self._missing() if pinned is None else pinned[1]

    def _missing(self) -> list[str]:
        caps = self.caps
        if not caps or 0 not in caps.values():  # one pass in C, for the usual answer
            return []
        return [name for name in self.engine_caps if caps.get(name) == 0]

    @property
    def failure(self) -> tuple[int, int] | None:
        """(step, errno) of the first OS call that failed, in the order the
        gate makes them: open, the engine's capabilities, its start-up
        ioctls, the guest's steps.  None when none failed."""
        pinned = self._pinned
        return self._first_failure() if pinned is None else pinned[0]

    def pin(self) -> None:
        """Keep ``failure`` and ``missing`` as they are now while the rules
        read them, many times over (see _diagnose)."""
        self._pinned = (self._first_failure(), self._missing())

    def unpin(self) -> None:
        self._pinned = None

    def _first_failure(self) -> tuple[int, int] | None:
        if self.open_errno is not None:
            return STEP_OPEN, self.open_errno
        # Most hosts refuse nothing: one pass in C over the answers says so.
        caps = self.caps
        if caps and min(caps.values()) < 0:
            for name in self.engine_caps:
                value = caps.get(name, 0)
                if value < 0:
                    return STEP_CHECK_EXTENSION, -value
        ioctls = self.ioctls
        if ioctls and max(ioctls.values()) > 0:
            for name in self.engine_ioctls:
                if ioctls.get(name, -1) > 0:
                    return _STARTUP_STEPS[name], ioctls[name]
        smoke = self.smoke
        if smoke is not None and smoke.step != STEP_DONE and not smoke.timed_out:
            return smoke.step, smoke.error
        return None

    def failed(self, *errnos: int, step: int | None = None) -> bool:
        """Whether an OS call failed (at ``step``, with one of ``errnos``)."""
        failure = self.failure
        if failure is None:
            return False
        return (step is None or failure[0] == step) and (not errnos or failure[1] in errnos)

    def opened(self, *errnos: int) -> bool:
        """Whether open(2) failed with one of ``errnos``."""
        return self.failed(*errnos, step=STEP_OPEN)

    @property
    def mac(self) -> bool:
        return self.platform == "darwin"

    def sysctl(self, name: str) -> int | str | None:
        return self.sysctls.get(name)


# ── Reaching the device: what the evidence says about access ────────────────


def _perm_allows(perm: int) -> bool:
    return perm & 0o6 == 0o6


def _owner_matches(ev: Evidence) -> bool:
    return not ev.unmapped("uid") and ev.euid == (ev.node or {}).get("uid")


def _group_matches(ev: Evidence) -> bool:
    return not ev.unmapped("gid") and (ev.node or {}).get("gid") in ev.groups


def _mode_lets_in(ev: Evidence) -> bool:
    """Whether the mode bits let this process read and write the node.

    Ids shown as the overflow id inside a user namespace are not mapped and
    match nothing: the "other" bits decide.
    """
    mode = int((ev.node or {}).get("mode", 0))
    if ev.euid == 0 and not ev.in_userns:
        return True
    if _owner_matches(ev):
        return _perm_allows(mode >> 6)
    if _group_matches(ev):
        return _perm_allows(mode >> 3)
    return _perm_allows(mode)


def _acl_denier(ev: Evidence) -> str | None:
    """The ACL entry that denies this process read-write, or None when the
    ACL (if any) lets it in or does not decide (POSIX.1e access check)."""
    acl, node = ev.acl or [], ev.node or {}
    if not acl or _owner_matches(ev):
        return None
    mask = next((int(e["perm"]) for e in acl if e["tag"] == "mask"), 0o7)
    named = [int(e["perm"]) for e in acl if e["tag"] == "user" and e["id"] == ev.euid]
    if named:
        return None if _perm_allows(named[0] & mask) else f"user:{ev.euid}:{named[0] & mask:o}"
    groups = [
        int(e["perm"])
        for e in acl
        if (e["tag"] == "group_obj" and node.get("gid") in ev.groups)
        or (e["tag"] == "group" and e["id"] in ev.groups)
    ]
    if groups:
        if any(_perm_allows(perm & mask) for perm in groups):
            return None
        return "mask" if not _perm_allows(mask) else "group entries without rw"
    return None


def _devices_allow_kvm(lines: Sequence[str]) -> bool | None:
    """Whether a cgroup v1 devices.list allows read-write on c 10:232; None
    when it cannot tell (a default-allow cgroup lists only "a *:* rwm" and
    hides its deny exceptions)."""
    if any(line.split()[:1] == ["a"] for line in lines if line.strip()):
        return None
    for line in lines:
        kind, _, rest = line.partition(" ")
        numbers, _, access = rest.partition(" ")
        major, _, minor = numbers.partition(":")
        if kind in ("c", "a") and major in ("*", "10") and minor in ("*", "232"):
            if "r" in access and "w" in access:
                return True
    return False


def _device_cgroup(ev: Evidence) -> str | None:
    """How the evidence shows a device cgroup: "shown" (its allowlist lacks
    c 10:232 rw), "possible" (this process is in a non-root device cgroup
    whose policy cannot be read, or in a container), or None."""
    cgroup = ev.cgroup or {}
    v1, listing, v2 = cgroup.get("devices"), cgroup.get("devices_list"), cgroup.get("unified")
    if listing is not None and _devices_allow_kvm(listing) is False:
        return "shown"
    if (v1 not in (None, "/")) or (v2 not in (None, "/")) or ev.runtime in _CONTAINERS:
        return "possible"
    return None


# Runtimes that put their processes in a device cgroup of their own.
_CONTAINERS = ("docker", "podman", "containerd", "kubernetes", "lxc", "systemd-nspawn", "container")


def _policy_candidates(f: Facts) -> list[str]:
    """The policies that could have refused the call, by what the evidence
    shows, in the order to check them: each one the errno or the evidence
    rules out is left out.  EPERM is a device cgroup or seccomp (never an
    LSM or Landlock); EACCES is an LSM, Landlock or seccomp (never a device
    cgroup, which answers EPERM on open only)."""
    ev = f.ev
    failure = f.failure or (STEP_OPEN, 0)
    eperm, on_open = failure[1] == errno.EPERM, failure[0] == STEP_OPEN
    cgroup = _device_cgroup(ev) if eperm and on_open else None
    context = ev.lsm_context or ""
    active = set(ev.lsm or ())
    candidates = []
    if cgroup == "shown":
        candidates.append("device cgroup")
    if not eperm:
        if ev.runtime == "flatpak":
            candidates.append("flatpak")
        if ev.runtime == "snap":
            candidates.append("snap")
        if context not in ("", "unconfined", "kernel"):
            selinux = "_t:" in context or context.count(":") >= 3
            candidates.append("SELinux" if selinux else "AppArmor")
    if ev.seccomp == "2":
        candidates.append("seccomp")
    if cgroup == "possible":
        candidates.append("device cgroup")
    if not eperm and ev.landlock_abi and not (active and "landlock" not in active):
        # Not visible from /proc: possible whenever the kernel has it.
        candidates.append("Landlock")
    return candidates


def _sole_policy(f: Facts, name: str) -> bool:
    """Whether ``name`` is the one policy the evidence leaves."""
    return f.failed(errno.EACCES, errno.EPERM) and _policy_candidates(f) == [name]


# ── The values causes are worded with ───────────────────────────────────────


def _who(ev: Evidence) -> str:
    """ "alice (uid 1000)", or "uid 65533" when the uid has no name."""
    uid = ev.euid if ev.euid is not None else os.geteuid()
    return f"{ev.user} (uid {uid})" if ev.user else f"uid {uid}"


def _node_text(node: Mapping[str, Any] | None) -> str | None:
    if not node:
        return None
    kind = node["kind"]
    if node.get("major") is not None:
        kind += f" {node['major']}:{node['minor']}"
    owner = node.get("owner") or f"uid {node['uid']}"
    group = node.get("group") or f"gid {node['gid']} (no name)"
    return f"{kind}, owner {owner}, group {group}, mode {int(node['mode']):04o}"


def _module_for(ev: Evidence) -> str:
    flags = ev.cpu_flags or set()
    if "svm" in flags or ev.vendor in ("AuthenticAMD", "HygonGenuine"):
        return "kvm_amd"
    if "vmx" in flags or ev.vendor == "GenuineIntel":
        return "kvm_intel"
    return "kvm_intel or kvm_amd"


def _stopped_at(result: SmokeResult) -> str:
    """Where and how the long-mode guest stopped, with what KVM reported."""
    reason = result.exit_reason
    text = f"{result.instruction} stopped the guest: {_exit_detail(result)}"
    if reason == KVM_EXIT_HLT:
        text = f"{result.instruction} stopped the guest: {exit_name(reason)} with EAX {result.proof:#x}, not the proof value"
    if result.insn_bytes:
        text += f"; instruction bytes {result.insn_bytes.hex(' ')}"
    if result.rip >= 0:
        text += f"; RIP {result.rip:#x}"
    return text


def _exit_detail(result: SmokeResult) -> str:
    """An exit by name, with what KVM said of it."""
    reason = result.exit_reason
    extra = {
        KVM_EXIT_FAIL_ENTRY: f", hardware entry failure reason "
        f"{result.hardware_entry_failure_reason:#x} on CPU {result.fail_entry_cpu}",
        KVM_EXIT_INTERNAL_ERROR: f", suberror "
        f"{INTERNAL_SUBERRORS.get(result.internal_suberror, 'UNLISTED')} ({result.internal_suberror})",
        KVM_EXIT_SHUTDOWN: " (the guest triple-faulted)",
    }
    return exit_name(reason) + extra.get(reason, "")


# What the trivial guests' failures say, by exit reason.
_EXIT_SUMMARIES = {
    KVM_EXIT_FAIL_ENTRY: "the CPU refused to enter the guest",
    KVM_EXIT_INTERNAL_ERROR: "KVM hit an internal error running the guest",
    KVM_EXIT_SHUTDOWN: "the vCPU shut down instead of running the guest",
}
_GUEST_TRIED = {
    "real-mode": f"run real-mode guest code (mov eax, {PROOF_VALUE:#x}; hlt) in a new VM",
    "long-mode": "run a 64-bit long-mode guest in a new VM, as direct-boot VMMs enter Linux",
    "aarch64": f"run arm64 guest code (x0 = {PROOF_VALUE:#x}; str w0, [{_ARM64_MMIO:#x}]) in a new VM",
}


def _policy_checks(f: Facts) -> str:
    """The policies that could refuse, as checks in order, each with its fix."""
    candidates = _policy_candidates(f)
    return "; ".join(
        f"({i}) {name}: {_POLICY_CHECKS[name].format_map(_Values(f))}"
        for i, name in enumerate(candidates, 1)
    )


# How to check each policy and what to change, for "check in this order".
_POLICY_CHECKS = {
    "device cgroup": "the device cgroup of {cgroup_path} ({cgroup_shown}): {cgroup_fix}",
    "seccomp": "allow openat and ioctl on {path} in this process's filter",
    "Landlock": "allow {path} read-write and its ioctls (LANDLOCK_ACCESS_FS_IOCTL_DEV) in the "
    "ruleset",
    "SELinux": "allow kvm_device_t for context {lsm_context} (containers: `setsebool -P "
    "container_use_devices on`); see `ausearch -m avc -ts recent`",
    "AppArmor": 'allow `{path} rw,` in profile {lsm_context}; see the apparmor="DENIED" '
    "lines of `dmesg`",
    "flatpak": "`flatpak override --device=kvm APP`",
    "snap": "`sudo snap connect {snap}:kvm`",
}

# Who made the device cgroup, and the fix that belongs to it.
_CGROUP_FIXES = {
    "docker": "start the container with `--device /dev/kvm` (a `-v /dev/kvm:/dev/kvm` bind "
    "mount is not let through the device cgroup), or add `--device-cgroup-rule='c 10:232 rwm'`",
    "kubernetes": "request the device from a device plugin (resources.limits "
    "devices.kubevirt.io/kvm: 1), or run the pod privileged with a hostPath volume for /dev/kvm",
    "systemd": "allow it for the unit: `DeviceAllow=/dev/kvm rw` (systemctl edit {unit}; a "
    "DevicePolicy=closed or strict unit refuses every device it does not list)",
    "systemd-nspawn": "start the container with `--bind=/dev/kvm` and allow it in its scope "
    "(`--property=DeviceAllow='/dev/kvm rw'`, which needs systemd as the manager)",
    "oci": "in the OCI config.json, list the node in linux.devices "
    '({{"path": "/dev/kvm", "type": "c", "major": 10, "minor": 232}}) and allow it in '
    'linux.resources.devices ({{"allow": true, "type": "c", "major": 10, "minor": 232, '
    '"access": "rwm"}})',
    "unknown": "allow c 10:232 rw where the cgroup was made: Docker or podman `--device "
    "/dev/kvm`; runc, crun or containerd: the node in linux.devices and `c 10:232 rwm` in "
    "linux.resources.devices; a systemd unit `DeviceAllow=/dev/kvm rw`",
}
_CGROUP_OWNERS = {"docker": "docker", "podman": "docker", "containerd": "oci"}
_CGROUP_OWNERS.update(kubernetes="kubernetes", lxc="unknown")
_CGROUP_OWNERS["systemd-nspawn"] = "systemd-nspawn"


def _cgroup_owner(ev: Evidence) -> str:
    """Who made this process's device cgroup, as a key of _CGROUP_FIXES."""
    if ev.runtime in _CGROUP_OWNERS:
        return _CGROUP_OWNERS[ev.runtime]
    return "systemd" if ev.systemd_unit else "unknown"


def _cgroup_shown(ev: Evidence) -> str | None:
    """What the device cgroup's policy shows, in words."""
    cgroup, how = ev.cgroup or {}, _device_cgroup(ev)
    listing = cgroup.get("devices_list")
    if how == "shown":
        return f"devices.list allows {', '.join(listing or []) or 'nothing'}, not c 10:232 rw"
    if how is None:
        return None
    if listing is not None:
        return "devices.list is `a *:* rwm`: it allows all but deny rules it does not list"
    if cgroup.get("devices") not in (None, "/"):
        return "its devices.list cannot be read"
    return "a cgroup v2 device policy is a BPF program, which cannot be read"


def _cgroup_path(ev: Evidence) -> str:
    cgroup = ev.cgroup or {}
    v1, v2 = cgroup.get("devices"), cgroup.get("unified")
    if v1 not in (None, "/"):
        return f"devices:{v1}"
    return f"0::{v2}" if v2 else "this process"


# Where this process runs, as the messages say it.
_CONTEXTS = {
    "kubernetes": "in a Kubernetes pod",
    "flatpak": "in a flatpak sandbox",
    "snap": "in a snap",
    "firejail": "in a firejail sandbox",
    "bubblewrap": "in a bubblewrap sandbox",
    "systemd-nspawn": "in a systemd-nspawn container",
    "lxc": "in an LXC container",
    "podman": "in a podman container",
    "docker": "in a Docker container",
    "containerd": "in a containerd container",
    "container": "in a container",
    "private-dev": "in a private /dev",
}


def _hv_answer(f: Facts) -> str | None:
    if f.hv is None:
        return None
    code, source = f.hv
    where = "in the engine's message" if source == "engine" else "from this process"
    return f"{HV_RETURN_NAMES.get(code, 'an unlisted code')} ({code:#x}) {where}"


def _sysctl_text(f: Facts, name: str) -> str:
    value = f.sysctl(name)
    if value is None:
        return f"{name} does not exist"
    return f"{name} = {value}" if isinstance(value, int) else f"{name}: {value}"


def _step(f: Facts) -> str:
    return STEP_NAMES[(f.failure or (STEP_DONE, 0))[0]]


def _mount_text(mount: Mapping[str, Any] | None) -> str | None:
    if not mount:
        return None
    return f"{mount['point']} ({mount['fstype']}, {','.join(mount['options'])})"


def _acl_text(entry: Mapping[str, Any]) -> str:
    who = f":{entry['id']}" if entry["id"] is not None else ""
    return f"{entry['tag']}{who}:{entry['perm']:o}"


def _mmio_text(mmio: Mapping[str, Any]) -> str:
    parts = [f"{k} {v}" if isinstance(v, bool) else f"{k} {v:#x}" for k, v in mmio.items()]
    return ", ".join(parts) or "none"


def _sandbox_shown(f: Facts, policy: str) -> str | None:
    """What shows a policy, in the words of an evidence line."""
    ev = f.ev
    return {
        "seccomp": "Seccomp: 2 (a filter)",
        "Landlock": f"Landlock ABI {ev.landlock_abi}; a Landlock domain is not visible from "
        "/proc, and nothing else that answers EACCES is active",
        "SELinux": f"context {ev.lsm_context}",
        "AppArmor": f"profile {ev.lsm_context}",
        "flatpak": "/.flatpak-info",
        "snap": f"SNAP_NAME={ev.snap}",
    }.get(policy)


# Each value a cause's text may name, from the facts, the evidence or the
# guest's result; None when they do not have it (an evidence line is then
# left out).
_VALUES: dict[str, Callable[[Facts], Any]] = {
    "path": lambda f: f.path,
    "tried": lambda f: f"open {f.path} read-write as {_who(f.ev)}" if f.opened() else _step(f),
    "answer": lambda f: errno_name(f.failure[1]) if f.failure and f.failure[1] else "no errno",
    "errno": lambda f: errno.errorcode.get(f.failure[1], str(f.failure[1])) if f.failure else None,
    "step": _step,
    "expected": lambda f: f"character device {KVM_DEVICE_MAJOR}:{KVM_DEVICE_MINOR}",
    "context": lambda f: _CONTEXTS.get(f.ev.runtime or ("private-dev" if f.ev.private_dev else "")),
    "policy_checks": _policy_checks,
    "refused_what": lambda f: "opening" if f.opened() else "an ioctl on",
    "sandbox": lambda f: _sandbox_shown(f, (_policy_candidates(f) or [""])[0]),
    "sandboxes": lambda f: ", ".join(_policy_candidates(f)) or "none visible",
    "engine": lambda f: f.engine,
    "caps_missing": lambda f: ", ".join(f"KVM_CAP_{n} ({KVM_CAPS[n]})" for n in f.missing),
    "caps_missing_names": lambda f: ", ".join(f.missing),
    "caps_answer": lambda f: "; ".join(
        f"KVM_CAP_{n} ({KVM_CAPS[n]}): {(f.caps or {}).get(n)}" for n in f.missing
    ),
    "ioctl": lambda f: next((n for n in f.engine_ioctls if (f.ioctls or {}).get(n, -1) > 0), None),
    "guest_tried": lambda f: _GUEST_TRIED.get(f.smoke.guest if f.smoke else "", "run guest code"),
    "timeout": lambda f: f"{f.smoke.timeout if f.smoke else f.timeout:g}",
    "expected_exit": lambda f: exit_name(KVM_EXIT_MMIO if f.arch == "aarch64" else KVM_EXIT_HLT),
    "proof": lambda f: f"{PROOF_VALUE:#x}",
    "stages": lambda f: ", ".join(name for _, name, *_ in LONG_MODE_STAGES[:-1]),
    "msrs_total": lambda f: len(BOOT_MSRS),
    "platform": lambda f: f.platform,
    "machine": lambda f: f.machine,
    "translated": lambda f: _sysctl_text(f, "sysctl.proc_translated"),
    "hv_support": lambda f: _sysctl_text(f, "kern.hv_support"),
    "vmm_present": lambda f: _sysctl_text(f, "kern.hv_vmm_present"),
    "max_address_spaces": lambda f: _sysctl_text(f, "kern.hv.max_address_spaces"),
    "hv_host": lambda f: ", ".join(_sysctl_text(f, name) for name in MACOS_SYSCTLS),
    "hv_name": lambda f: HV_RETURN_NAMES.get(f.hv[0], "an unlisted code") if f.hv else None,
    "hv_hex": lambda f: f"{f.hv[0]:#x}" if f.hv else None,
    "hv_answer": _hv_answer,
    "hv_tried": lambda f: (
        "call hv_vm_create(NULL) in this process (it holds the hypervisor entitlement)"
        if f.hv and f.hv[1] == "process"
        else "look for an hv_return_t in the engine's message"
    ),
    "executable": lambda f: sys.executable or "this interpreter",
    "entitlement": lambda f: (
        "has entitlements that cannot be read"
        if f.entitled is None
        else "is not entitled to Hypervisor.framework"
    ),
    "engine_message": lambda f: f.message,
    "decoded": lambda f: "; ".join(f.decoded) or None,
    "note": lambda f: f.note,
    "nested": lambda f: (
        "enable nested virtualization for this machine on its host (cloud "
        "instances need it switched on explicitly) and make sure kvm_intel or kvm_amd is loaded"
    ),
    "el2": lambda f: (
        "run the kernel at EL2 with KVM working: boot it on bare metal or with "
        "firmware that hands over EL2; on a cloud VM, an instance type with nested virtualization"
    ),
    "relogin": lambda f: (
        "log out and back in (a running login session does not pick up new groups)"
    ),
}
_EVIDENCE_VALUES: dict[str, Callable[[Evidence], Any]] = {
    "device": lambda ev: _node_text(ev.node),
    "user": lambda ev: ev.user or (f"uid {ev.euid}" if ev.euid is not None else "$USER"),
    "group": lambda ev: (ev.node or {}).get("group") or str((ev.node or {}).get("gid", "kvm")),
    "gid": lambda ev: (ev.node or {}).get("gid"),
    "mode": lambda ev: f"{int((ev.node or {}).get('mode', 0)):04o}",
    "kernel": lambda ev: ev.kernel,
    "kvm_modules_loaded": lambda ev: ", ".join(ev.kvm_modules) or "none",
    "driver": lambda ev: ", ".join(m for m in ev.kvm_modules if m != "kvm") or "kvm",
    "module": _module_for,
    "cpu": lambda ev: "AMD-V" if _module_for(ev) == "kvm_amd" else "VT-x",
    "seen": lambda ev: ", ".join(ev.runtime_evidence) or None,
    "mount": lambda ev: _mount_text(ev.mount),
    "mount_point": lambda ev: (ev.mount or {}).get("point"),
    "bound": lambda ev: f"{ev.mount['root']} ({ev.mount['fstype']})" if ev.mount else None,
    "uid_map": lambda ev: (ev.userns or {}).get("uid_map") or "empty (nothing mapped)",
    "gid_map": lambda ev: (ev.userns or {}).get("gid_map") or "empty (nothing mapped)",
    "acl": lambda ev: ", ".join(_acl_text(e) for e in ev.acl or []) or None,
    "acl_denier": _acl_denier,
    "limit": lambda ev: "soft {}, hard {}".format(*ev.rlimit_nofile) if ev.rlimit_nofile else None,
    "soft_limit": lambda ev: ev.rlimit_nofile[0] if ev.rlimit_nofile else "?",
    "file_max": lambda ev: ev.file_max or "unknown",
    "runtime_root": lambda ev: " (root here is not root on the host)" if ev.euid == 0 else "",
    "lsm_context": lambda ev: ev.lsm_context or "unconfined",
    "snap": lambda ev: ev.snap or "APP",
    "cgroup_path": lambda ev: _cgroup_path(ev) if _device_cgroup(ev) else None,
    "cgroup_shown": _cgroup_shown,
    "cgroup_fix": lambda ev: _CGROUP_FIXES[_cgroup_owner(ev)].format(unit=ev.systemd_unit),
    "unit": lambda ev: ev.systemd_unit,
    "seccomp_mode": lambda ev: {"0": "none", "1": "strict", "2": "a filter"}.get(ev.seccomp or ""),
    "no_new_privs": lambda ev: None if ev.no_new_privs is None else str(int(ev.no_new_privs)),
    "provider": lambda ev: ev.kvm_provider or "unknown",
}
_SMOKE_VALUES: dict[str, Callable[[SmokeResult], Any]] = {
    "backend": lambda r: r.backend,
    "exit": _exit_detail,
    "exit_summary": lambda r: (
        _EXIT_SUMMARIES.get(r.exit_reason) or f"unexpected exit {exit_name(r.exit_reason)}"
    ),
    "proof_seen": lambda r: (
        f"MMIO {_mmio_text(r.mmio)} and X0 {r.proof:#x}"
        if r.guest == "aarch64"
        else f"EAX {r.proof:#x}"
    ),
    "speed": lambda r: r.speed.describe() if r.speed else None,
    "ratio": lambda r: _times(r.speed.ratio or 0) if r.speed else None,
    "stock_kernel": lambda r: "the stock-kernel instructions ran" if r.ok else _stopped_at(r),
    "stopped_at": _stopped_at,
    "instruction": lambda r: r.instruction,
    "cpuid_offered": lambda r: (
        ", ".join(n for n, on in r.cpuid.items() if on) or "none of " + ", ".join(CPUID_FEATURES)
    ),
    "msr_refused": lambda r: r.msrs.get("boot_msr_refused"),
    "msrs_set": lambda r: r.msrs.get("boot_msrs_set"),
    "arch_value": lambda r: (r.msrs.get("arch_capabilities") or {}).get("value") or "unread",
    "api_version": lambda r: r.api_version,
}


def _deep_fix(r: BootResult) -> str:
    if r.exit_reason == KVM_EXIT_INTERNAL_ERROR:
        return (
            "KVM could not run an instruction of the kernel (it fell back to its emulator): move "
            "to a host whose CPU gives KVM VT-x/AMD-V (bare metal, or a cloud VM with nested "
            "virtualization), or on kvm_pvm run a PVM-enabled guest kernel"
        )
    return (
        "the kernel needs something this KVM does not give it: compare its CPUID and MSRs "
        "(the guest.* findings) with a host where it boots, and update the host kernel"
    )


_DEEP_VALUES: dict[str, Callable[[BootResult], Any]] = {
    "boot_kernel": lambda r: r.kernel,
    "kernel_file": lambda r: r.kernel_path,
    "deep_tried": lambda r: (
        f"boot {r.kernel} from {r.kernel_path} in a throwaway VM "
        f"({r.mem_size // _MIB} MiB, in-kernel irqchip and PIT, cmdline {BOOT_CMDLINE!r}), "
        f"answering its port IO, for at most {r.timeout:g} s"
    ),
    "deep_step": lambda r: STEP_NAMES[r.step] if r.step != STEP_DONE else None,
    "deep_errno": lambda r: errno_name(r.error) if r.error else "no errno",
    "deep_when": lambda r: f"{r.elapsed:.2f} s",
    "deep_stop": lambda r: r.stop_text(),
    "deep_stop_short": lambda r: (
        f"KVM_EXIT_{EXIT_REASONS.get(r.exit_reason, r.exit_reason)} at "
        + (r.instruction or (f"RIP {r.rip:#x}" if r.rip >= 0 else "an unknown place"))
    ),
    "deep_milestones": lambda r: r.milestones_text(),
    "deep_exits": lambda r: f"{r.exit_count} ({r.exits_text()})",
    "deep_panic": lambda r: r.panic,
    "deep_timeout": lambda r: f"{r.timeout:g}",
    "deep_fix": _deep_fix,
    "console": lambda r: r.console,
}


#: How each value is labelled when it is shown as evidence.
_LABELS = {
    "device": "Device",
    "expected": "Expected",
    "kernel": "Kernel",
    "kvm_modules_loaded": "KVM modules loaded",
    "context": "Context",
    "seen": "Seen",
    "mount": "Mount",
    "bound": "Bound over it",
    "uid_map": "uid_map",
    "gid_map": "gid_map",
    "acl": "ACL",
    "limit": "Limit",
    "sandbox": "Sandbox",
    "sandboxes": "Policies seen",
    "cgroup_path": "Device cgroup",
    "seccomp_mode": "Seccomp",
    "no_new_privs": "NoNewPrivs",
    "provider": "KVM provider",
    "backend": "Backend",
    "stock_kernel": "Stock kernel instructions",
    "cpuid_offered": "CPUID offers",
    "vmm_present": "VMM present",
    "max_address_spaces": "Address spaces",
    "hv_host": "Host",
    "executable": "Executable",
    "engine_message": "Engine said",
    "decoded": "Decoded",
    "unit": "systemd unit",
    "cgroup_shown": "Its policy",
    "kernel_file": "Kernel file",
    "deep_milestones": "Milestones",
    "console": "Last console line",
    "deep_exits": "KVM exits",
}


class _Values(dict):  # type: ignore[type-arg]
    """The values of one facts value, computed as a template asks for them."""

    def __init__(self, facts: Facts, strict: bool = True) -> None:
        super().__init__()
        self.facts, self.strict = facts, strict

    def raw(self, key: str) -> Any:
        """A value, or None when the facts do not have it."""
        if key in _EVIDENCE_VALUES:
            return _EVIDENCE_VALUES[key](self.facts.ev)
        if key in _SMOKE_VALUES:
            smoke = self.facts.smoke
            return None if smoke is None else _SMOKE_VALUES[key](smoke)
        if key in _DEEP_VALUES:
            deep = self.facts.deep
            return None if deep is None else _DEEP_VALUES[key](deep)
        return _VALUES[key](self.facts)

    def __missing__(self, key: str) -> Any:
        value = self.raw(key)
        if value is None:
            if self.strict:
                raise _NoValue(key)
            value = "(not known)"
        self[key] = value
        return value


class _NoValue(LookupError):
    """A cause's text asked for a value its facts do not have."""


# ── Causes: one registry, one ordered rule table ────────────────────────────


class _Cause:
    """One cause as data: its error class, the layer (the finding, or
    "engine") it fails, its summary, what was tried and answered, the
    values shown as evidence, and its fix.  Texts are templates over _VALUES."""

    __slots__ = ("answer", "cls", "fix", "layer", "shown", "summary", "tried")

    def __init__(self, cls: type[BoxliteError], layer: str, fields: Mapping[str, str]) -> None:
        self.cls, self.layer = cls, layer
        self.summary, self.fix = fields["summary"], fields["fix"]
        self.tried = fields.get("tried", "{tried}")
        self.answer = fields.get("answer", "{answer}")
        self.shown = tuple(name for name in fields.get("shown", "").split(", ") if name)


#: Every cause the checker can name, one block each: "== KEY CLASS LAYER
#: (values shown as evidence)", the summary, then "tried:", "answer:" and
#: "fix:" (a line indented under one continues it).  KEY is "cause-id" or
#: "cause-id/variant": the same cause with the fix that fits other
#: evidence; err.cause is the part before the slash.  "tried" and "answer"
#: default to the OS call that failed and its errno.  RULES says when each
#: cause holds.
_CAUSE_TABLE = """
== platform-unsupported UnsupportedError platform
BoxLite only supports Linux and macOS (this is {platform})
tried: identify the operating system (sys.platform)
answer: {platform}
fix: run on Linux with KVM, or on macOS on Apple Silicon
== rosetta UnsupportedError macos.arch
Unsupported architecture: {machine} Python running under Rosetta on Apple Silicon
tried: read sysctl sysctl.proc_translated (sysctlbyname)
answer: {translated}
fix: run an arm64 Python (a universal2 or arm64 build started natively: `arch -arm64
    python3`); Hypervisor.framework is not available to a translated process
== macos-not-arm64 UnsupportedError macos.arch
Unsupported architecture: {machine}: BoxLite on macOS needs Apple Silicon (arm64)
tried: read the machine type (uname) and sysctl.proc_translated
answer: {machine}, {translated}
fix: use a Mac with Apple Silicon; Intel Macs are not supported
== hv-support-unreadable UnsupportedError macos.hv_support
Hypervisor.framework support cannot be read
tried: read sysctl kern.hv_support (sysctlbyname)
answer: {hv_support}
fix: check by hand with `sysctl kern.hv_support`
== hv-in-vm UnsupportedError macos.hv_support (vmm_present)
Hypervisor.framework is not available: this Mac is itself a virtual machine without
    nested virtualization
tried: read sysctl kern.hv_support (sysctlbyname)
answer: {hv_support}
fix: run on a physical Mac (macOS VMs get no nested virtualization before macOS 15 on M3 or
    later)
== hv-unsupported UnsupportedError macos.hv_support
Hypervisor.framework is not available
tried: read sysctl kern.hv_support (sysctlbyname)
answer: {hv_support}
fix: use macOS 11 or later on Apple Silicon; check with `sysctl kern.hv_support`
== hv-no-resources ResourceExhaustedError macos.hv_vm_create (max_address_spaces)
macOS Hypervisor.framework has no VM address space left (kern.hv.max_address_spaces)
tried: {hv_tried}
answer: {hv_answer}
fix: Stop some boxes and retry; the limit is `sysctl kern.hv.max_address_spaces`
== hv-denied UnsupportedError macos.hv_vm_create (executable)
Hypervisor.framework access denied: this process lacks the
    com.apple.security.hypervisor entitlement
tried: {hv_tried}
answer: {hv_answer}
fix: sign {executable} with the com.apple.security.hypervisor entitlement
== hv-denied/helper UnsupportedError macos.hv_vm_create (engine_message)
Hypervisor.framework access denied to the engine's helper: it lacks the
    com.apple.security.hypervisor entitlement
tried: {hv_tried}
answer: {hv_answer}
fix: sign the engine's helper with that entitlement (re-signing with `codesign --force --sign
    -` strips it); check with `codesign -d --entitlements - HELPER`
== hv-unsupported-code UnsupportedError macos.hv_vm_create
Hypervisor.framework has no hypervisor for this process (HV_UNSUPPORTED), as inside a
    VM without nested virtualization
tried: {hv_tried}
answer: {hv_answer}
fix: run on a physical Apple Silicon Mac
== hv-busy EngineError macos.hv_vm_create (engine_message)
the engine's process already has a VM (HV_BUSY): this is not a host problem
tried: {hv_tried}
answer: {hv_answer}
fix: report it to the engine: Hypervisor.framework allows one VM per process
== hv-engine-code EngineError macos.hv_vm_create (engine_message, hv_host)
the engine's hv_vm_create returned {hv_name} ({hv_hex})
tried: {hv_tried}
answer: {hv_answer}
fix: see the engine's log for the VM it asked for; the host facts above say the host supports
    Hypervisor.framework
== hv-other EngineError macos.hv_vm_create (engine_message)
the engine failed, and hv_vm_create in this process returned {hv_name} ({hv_hex})
tried: {hv_tried}
answer: {hv_answer}
fix: look up {hv_name} in <Hypervisor/hv_error.h> and report it with the engine's message
== hv-engine-error EngineError macos.hv_vm_create (engine_message, hv_host)
Not probed here: this process {entitlement}, so a probe from it would answer
    HV_DENIED whatever the engine's cause
tried: look for an hv_return_t in the engine's message
answer: none found
fix: read the engine's own log for its hv_return_t; the host facts above say whether the host
    supports Hypervisor.framework
== kvm-wsl1 UnsupportedError kvm.device (kernel)
{path} does not exist: WSL 1 has no KVM at all
fix: convert the distribution to WSL 2: `wsl --set-version DISTRO 2` (in Windows), then enable
    nested virtualization
== kvm-missing-wsl UnsupportedError kvm.device (kernel)
{path} does not exist: this WSL 2 instance has no nested virtualization
fix: nested virtualization in WSL 2 needs Windows 11: set nestedVirtualization=true under
    [wsl2] in %UserProfile%\\.wslconfig, then `wsl --shutdown` and start WSL again
== kvm-not-kvm-device/bind UnsupportedError kvm.device (device, expected, mount)
{path} is not the KVM device: {bound} is bind-mounted over it
fix: remove the bind mount: `sudo umount {path}` (the KVM node is under it), or mount the
    host's /dev/kvm there instead
== kvm-not-kvm-device/container UnsupportedError kvm.device (device, expected, seen)
{path} is not the KVM device ({context}): it is a {device}
fix: pass the host's node in instead of what is there: `--device /dev/kvm` (a `docker -v
    /dev/kvm:/dev/kvm` on a host without KVM leaves a directory)
== kvm-not-kvm-device UnsupportedError kvm.device (device, expected)
{path} is not the KVM device: it is a {device}
fix: remove what is at {path} and recreate the node: `sudo mknod {path} c 10 232` (or let
    udev do it)
== kvm-not-kvm-device/unanswered UnsupportedError kvm.device (device)
{path} does not answer as the KVM device ({errno} from {step})
fix: check what driver owns {path} (`ls -l {path}`, `cat /proc/misc`); the KVM node is
    character device 10:232
== kvm-missing-container/kubernetes UnsupportedError kvm.device (seen)
{path} does not exist in this pod: the node's device was not passed in
fix: request the device from a device plugin (resources.limits devices.kubevirt.io/kvm: 1, or
    a generic device plugin), or run the pod privileged with a hostPath volume for /dev/kvm
== kvm-missing-container/flatpak UnsupportedError kvm.device (seen)
{path} does not exist in this flatpak sandbox
fix: `flatpak override --device=kvm APP` (or --device=all), then restart the app
== kvm-missing-container/snap UnsupportedError kvm.device (seen)
{path} does not exist in this snap
fix: `sudo snap connect {snap}:kvm`
== kvm-missing-container/firejail UnsupportedError kvm.device (seen)
{path} does not exist in this firejail sandbox (its profile gives it a private /dev)
fix: start it with `firejail --ignore=private-dev ...` (or `--noprofile`), or add `ignore
    private-dev` to its profile
== kvm-missing-container/bubblewrap UnsupportedError kvm.device (seen)
{path} does not exist in this bubblewrap sandbox (`--dev` makes a /dev without it)
fix: add `--dev-bind /dev/kvm /dev/kvm` to the bwrap command line
== kvm-missing-container/systemd-nspawn UnsupportedError kvm.device (seen)
{path} does not exist in this systemd-nspawn container
fix: start it with `--bind=/dev/kvm` (and `--property=DeviceAllow='/dev/kvm rw'` when systemd
    manages it)
== kvm-missing-container/lxc UnsupportedError kvm.device (seen)
{path} does not exist in this LXC container
fix: `lxc config device add CONTAINER kvm unix-char path=/dev/kvm`
== kvm-missing-container UnsupportedError kvm.device (seen)
{path} does not exist {context}: the host's device was not passed in
fix: pass the device in: `--device /dev/kvm` (docker, podman, nerdctl; in a compose file
    `devices: ["/dev/kvm:/dev/kvm"]`); with runc, crun or containerd, list it in the config's
    linux.devices and allow `c 10:232 rwm` in linux.resources.devices
== kvm-missing-container/service UnsupportedError kvm.device (unit)
{path} does not exist in this process's private /dev (systemd PrivateDevices=, or a
    sandbox)
fix: for a systemd service: `PrivateDevices=no`, or keep it and add `DeviceAllow=/dev/kvm rw`
    with `BindPaths=/dev/kvm`; for a sandbox, bind the host's /dev/kvm in
== kvm-node-missing UnsupportedError kvm.device (kvm_modules_loaded)
{driver} is loaded but {path} does not exist
fix: create the node: `sudo mknod {path} c 10 232 && sudo chmod 0660 {path}` (udev normally
    does it: check that it runs)
== kvm-module-not-loaded UnsupportedError kvm.device (kvm_modules_loaded)
{path} does not exist: the CPU has {cpu} but no KVM module is loaded
fix: `sudo modprobe {module}` (if it fails with 'Operation not supported', enable
    virtualization in the firmware setup)
== kvm-no-el2 UnsupportedError kvm.device (kernel, kvm_modules_loaded)
{path} does not exist: the kernel was not started at EL2
fix: KVM on arm64 needs the kernel started at EL2: {el2}
== kvm-pvm-not-loaded UnsupportedError kvm.device (kernel, kvm_modules_loaded)
{path} does not exist: kvm_pvm is available but not loaded
fix: load the paravirtual KVM this kernel ships: `sudo modprobe kvm_pvm`
== kvm-no-nested UnsupportedError kvm.device (kernel, kvm_modules_loaded)
{path} does not exist: this machine is itself a VM whose hypervisor does not pass
    VT-x/AMD-V through
fix: enable nested virtualization for this VM on its host (on a cloud, an instance type that
    offers it), then load kvm_intel or kvm_amd
== kvm-no-virtualization UnsupportedError kvm.device (kernel, kvm_modules_loaded)
{path} does not exist and the CPU reports no VT-x/AMD-V
fix: enable Intel VT-x or AMD-V (SVM) in the BIOS/UEFI setup, then `sudo modprobe {module}`
== kvm-no-driver/arm64 UnsupportedError kvm.smoke (device, kvm_modules_loaded)
{path} exists but no KVM driver answers for it
fix: {el2}
== kvm-no-driver UnsupportedError kvm.smoke (device, kvm_modules_loaded)
{path} exists but no KVM driver answers for it
fix: load the KVM module: `sudo modprobe {module}`
== fd-limit ResourceExhaustedError kvm.smoke (limit)
this process hit its open-file limit (RLIMIT_NOFILE {soft_limit})
fix: raise the limit (`ulimit -n`, LimitNOFILE= for a service) or close descriptors this
    process leaks
== system-file-limit ResourceExhaustedError kvm.smoke
the system-wide open-file limit is reached (fs.file-max {file_max})
fix: raise fs.file-max (`sysctl -w fs.file-max=...`) or stop what holds the files
== out-of-memory ResourceExhaustedError kvm.smoke
the kernel could not allocate memory for the VM
fix: free memory, or raise this process's memory limit (cgroup memory.max, `ulimit -v`)
== kvm-nodev UnsupportedError kvm.smoke (device, mount)
{path} looks right but sits on a filesystem mounted nodev ({mount_point})
fix: bind-mount the host's node instead (`mount --bind /dev/kvm {path}`); in a user namespace
    every new mount is nodev, so pass the device in (`--device /dev/kvm`)
== kvm-userns/firejail UnsupportedError kvm.smoke (device, uid_map, seen)
{path}: permission denied: firejail's noroot user namespace drops the device's group,
    which shows as {group}
fix: start it without noroot (drop `--noroot`, or `--ignore=noroot` where its profile sets
    it), or give the user an ACL on the host node (`sudo setfacl -m u:{user}:rw /dev/kvm`)
== kvm-userns/unmapped-group UnsupportedError kvm.smoke (device, uid_map, gid_map)
{path}: permission denied in a user namespace{runtime_root}: the device's group is not
    mapped here (it shows as {group})
fix: check in this order: (1) run `id` as the host user: if it lists the device's group, the
    runtime dropped it: keep it with `podman run --group-add keep-groups` (crun); (2) if not,
    add the host user to that group on the host (`sudo usermod -aG GROUP USER`) or give it an
    ACL (`sudo setfacl -m u:USER:rw {path}`)
== kvm-userns UnsupportedError kvm.smoke (device, uid_map, gid_map)
{path}: permission denied in a user namespace{runtime_root}: the host user it maps to
    has no access to the node
fix: on the host, add that user to group {group} (`sudo usermod -aG {group} USER`) or give it
    an ACL (`sudo setfacl -m u:USER:rw {path}`)
== kvm-acl-denies UnsupportedError kvm.smoke (device, acl)
{path}: permission denied by its access control list ({acl_denier})
fix: `sudo setfacl -m u:{user}:rw {path}` (or remove the entry that denies: `getfacl {path}`)
== kvm-mode-no-group/no-kvm-group UnsupportedError kvm.smoke (device)
{path}: permission denied, and its mode {mode} lets no group in
fix: `sudo groupadd --system kvm` (this host has no kvm group); then write the udev rule
    `KERNEL=="kvm", GROUP="kvm", MODE="0660"` to /etc/udev/rules.d/65-kvm.rules; then `sudo
    udevadm control --reload && sudo udevadm trigger --name-match=kvm`; then `sudo usermod
    -aG kvm {user}`, then {relogin}
== kvm-mode-no-group UnsupportedError kvm.smoke (device)
{path}: permission denied, and its mode {mode} lets no group in
fix: write the udev rule `KERNEL=="kvm", GROUP="kvm", MODE="0660"` to
    /etc/udev/rules.d/65-kvm.rules; then `sudo udevadm control --reload && sudo udevadm
    trigger --name-match=kvm`; then `sudo usermod -aG kvm {user}`, then {relogin}
== kvm-stale-session UnsupportedError kvm.smoke (device)
{path}: permission denied: {user} is in group {group}, but this session started
    before that and does not have it
fix: log out and back in (or start a shell with the group: `newgrp {group}`); a running login
    session does not pick up new groups
== kvm-not-in-group/unnamed UnsupportedError kvm.smoke (device)
{path}: permission denied: its group {gid} has no name in the group database, and
    {user} does not hold it
fix: give the gid a name and join it: `sudo groupadd --gid {gid} kvm` (or `sudo groupmod
    --gid {gid} kvm` for an existing kvm group), then `sudo usermod -aG kvm {user}` and
    {relogin}; or give the node a named group: `sudo chgrp kvm {path}` with a udev rule that
    keeps it
== kvm-not-in-group UnsupportedError kvm.smoke (device)
{path}: permission denied: {user} is not in group {group}
fix: `sudo usermod -aG {group} {user}`, then {relogin}
== kvm-device-cgroup UnsupportedError kvm.smoke (device, cgroup_path, cgroup_shown, context, unit)
{path} is refused by this process's device cgroup (EPERM on open, even as root)
fix: {cgroup_fix}
== kvm-seccomp-denied UnsupportedError kvm.smoke (device, sandbox, no_new_privs)
{refused_what} {path} is refused by this process's seccomp filter
fix: allow openat of {path} and ioctl on it in the seccomp policy (Docker and podman:
    `--security-opt seccomp=PROFILE` with a profile that allows them)
== kvm-landlock-denied UnsupportedError kvm.smoke (device, sandbox, no_new_privs)
{refused_what} {path} is refused by Landlock (the device's mode lets this process in)
fix: allow {path} read-write (LANDLOCK_ACCESS_FS_READ_FILE|WRITE_FILE) and its ioctls
    (LANDLOCK_ACCESS_FS_IOCTL_DEV) in the sandbox's ruleset
== kvm-selinux-denied UnsupportedError kvm.smoke (device, sandbox)
{refused_what} {path} is refused by SELinux (the device's mode lets this process in)
fix: allow kvm_device_t for this domain (for containers: `setsebool -P container_use_devices
    on`); see `ausearch -m avc -ts recent`
== kvm-apparmor-denied UnsupportedError kvm.smoke (device, sandbox)
{refused_what} {path} is refused by AppArmor (the device's mode lets this process in)
fix: allow `{path} rw,` in that profile; see the apparmor="DENIED" lines of `dmesg`
== kvm-flatpak-denied UnsupportedError kvm.smoke (device, sandbox)
{refused_what} {path} is refused by the flatpak sandbox
fix: `flatpak override --device=kvm APP` (or --device=all), then restart the app
== kvm-snap-denied UnsupportedError kvm.smoke (device, sandbox)
{refused_what} {path} is refused by the snap's confinement
fix: `sudo snap connect {snap}:kvm`
== kvm-access-policy UnsupportedError kvm.smoke (device, sandboxes, cgroup_path, no_new_privs)
{refused_what} {path} is refused by a policy ({errno}), and more than one could be
    the one
fix: check in this order: {policy_checks}
== kvm-access-policy/unseen UnsupportedError kvm.smoke (device, seccomp_mode, no_new_privs)
{refused_what} {path} is refused ({errno}) although the node's mode lets this process
    in, and no policy that answers so is visible
fix: check in this order: (1) the audit log (`dmesg`, `ausearch -m avc -ts recent`) for an LSM
    denial; (2) the sandbox or service manager that started this process (its seccomp filter,
    Landlock ruleset, or systemd DevicePolicy=)
== kvm-open-failed UnsupportedError kvm.smoke (device, mount)
{path} cannot be opened read-write ({errno})
fix: the device must open read-write for this process: look up the answer above for what
    refuses it on this system
== kvm-api-version UnsupportedError kvm.smoke (kernel)
KVM reports API version {api_version}, expected 12
answer: version {api_version}
fix: use a kernel whose KVM speaks API version 12 (every mainline kernel since 2.6.22)
== kvm-busy UnsupportedError kvm.smoke
KVM cannot create a VM: another hypervisor holds the CPU's virtualization extensions
fix: quit the other hypervisor (VirtualBox, VMware) or unload its module, then retry
== kvm-capability-missing/seccomp UnsupportedError engine (seccomp_mode, kernel, provider)
{engine} would not start: KVM reports {caps_missing_names} missing, and a seccomp
    filter may be the one answering
tried: KVM_CHECK_EXTENSION for the capabilities {engine} refuses to start without
answer: {caps_answer}
fix: check in this order: (1) run `python3 -m boxlite_syscheck --engine {engine}` outside this
    sandbox; if it passes there, allow KVM_CHECK_EXTENSION and KVM's ioctls in the seccomp
    policy; (2) otherwise the host's KVM lacks them: update the host kernel
== kvm-capability-missing UnsupportedError engine (kernel, provider)
{engine} would not start: this KVM lacks {caps_missing}
tried: KVM_CHECK_EXTENSION for the capabilities {engine} refuses to start without
answer: {caps_answer}
fix: update the host kernel (or the {provider} module) to one whose KVM offers
    {caps_missing_names}; every mainline kernel since 5.10 does
== startup-ioctl-failed UnsupportedError engine (kernel, provider)
{engine} would not start: KVM refuses {ioctl}, which it issues at start-up
fix: update the host kernel (or the {provider} module), and report the answer above to the KVM
    provider
== kvm-step-failed EngineError kvm.smoke (backend, kernel)
KVM smoke test failed: could not {step}
fix: this KVM refuses a basic operation every VMM needs: update the kernel, and report the
    answer above to the KVM provider if it persists
== smoke-timeout/arm64 UnsupportedError kvm.smoke (backend, kernel)
KVM smoke test failed: the guest did not stop within {timeout} s
tried: {guest_tried}
answer: KVM_RUN was still running after {timeout} s
fix: retry with a longer --timeout if the host is heavily loaded; if it persists: {el2}
== smoke-timeout UnsupportedError kvm.smoke (backend, kernel)
KVM smoke test failed: the guest did not halt within {timeout} s
tried: {guest_tried}
answer: KVM_RUN was still running after {timeout} s
fix: retry with a longer --timeout if the host is heavily loaded; if it persists, guest code
    does not run here: {nested}
== guest-emulated-pvm UnsupportedError guest.speed (provider, stock_kernel, backend, kernel)
guest code is emulated in software (about {ratio}x the host): this KVM is kvm_pvm,
    which runs only PVM-enabled guest kernels at speed
tried: run a 64-bit guest loop (dec ecx; jnz) under KVM, and the same loop on the host CPU
answer: {speed}
fix: run a PVM-enabled guest kernel with an engine that supports PVM, or move to a host whose
    CPU gives KVM VT-x/AMD-V: bare metal, or a cloud VM with nested virtualization
== guest-emulated UnsupportedError guest.speed (provider, stock_kernel, backend, kernel)
guest code is emulated in software: about {ratio}x the same loop on the host CPU
tried: run a 64-bit guest loop (dec ecx; jnz) under KVM, and the same loop on the host CPU
answer: {speed}
fix: run on a host whose KVM executes guest code in hardware: VT-x/AMD-V enabled in the
    firmware, or nested virtualization enabled for this VM on its host
== smoke-no-proof UnsupportedError kvm.smoke (backend, kernel)
KVM smoke test failed: the guest stopped as expected but did not run the expected code
tried: {guest_tried}
answer: {exit} with {proof_seen}, expected {proof}
fix: this KVM mis-executes guest code: update the host kernel (and the outer hypervisor, if
    nested) and report it to its vendor
== smoke-exit/arm64 UnsupportedError kvm.smoke (backend, kernel)
KVM smoke test failed: {exit_summary} (expected {expected_exit})
tried: {guest_tried}
answer: {exit}
fix: {path} exists but cannot run guest code: {el2}
== smoke-exit UnsupportedError kvm.smoke (backend, kernel)
KVM smoke test failed: {exit_summary} (expected {expected_exit})
tried: {guest_tried}
answer: {exit}
fix: {path} exists but cannot run guest code: {nested}
== guest-instruction-failed UnsupportedError guest.stock_kernel (cpuid_offered, provider, backend, kernel)
KVM cannot run what a stock Linux kernel runs early: {instruction} stopped the guest
tried: enter 64-bit long mode directly (as Firecracker, cloud-hypervisor and libkrun boot
    Linux) and run {stages}
answer: {stopped_at}
fix: update the host kernel (and the outer hypervisor, if this host is itself a VM) and report
    the instruction and bytes above to the KVM provider
== msr-refused UnsupportedError guest.msrs (provider, backend, kernel)
KVM refuses the MSR {msr_refused} that direct-boot VMMs set before Linux starts
tried: set the MSRs a Linux boot needs (KVM_SET_MSRS)
answer: KVM_SET_MSRS set {msrs_set} of {msrs_total} MSRs and stopped at {msr_refused}
fix: update the host kernel (and the outer hypervisor, if nested); Firecracker and libkrun
    cannot boot a guest without this MSR
== msr-arch-capabilities-refused UnsupportedError engine (provider, kernel)
QEMU with -cpu host would abort at start: CPUID offers ARCH_CAPABILITIES, but KVM
    refuses to set MSR 0x10a
tried: read MSR 0x10a as a feature MSR (KVM_GET_MSRS on /dev/kvm) and set it on a vCPU
    (KVM_SET_MSRS), as QEMU does
answer: value {arch_value}, not accepted
fix: start QEMU with -cpu host,-arch-capabilities (or a named CPU model), or update the host
    kernel
== engine-error-decoded EngineError engine (engine_message)
{engine} failed on a host that passes its check: {decoded}
tried: check this host again for {engine}, and decode the engine's message
answer: the host passes; the message says: {decoded}
fix: the cause lies in what the engine asked for, not in KVM's availability: see the decoded
    values above and the engine's configuration
== deep-boot-failed UnsupportedError deep.boot (kernel_file)
the VM for the engine's kernel could not be set up: {deep_step} failed ({deep_errno})
tried: {deep_tried}
answer: {deep_step}: {deep_errno}
fix: the engine builds its VM with the same calls: see the errno and the device, capability and
    start-up findings for the same call
== deep-boot-stopped UnsupportedError deep.boot (kernel_file, deep_milestones, console, deep_exits)
the engine's kernel ({boot_kernel}) stopped {deep_when} into its boot: {deep_stop_short}
tried: {deep_tried}
answer: {deep_stop}, after {deep_when}
fix: {deep_fix}
== deep-boot-panicked UnsupportedError deep.boot (kernel_file, deep_milestones, deep_exits)
the engine's kernel ({boot_kernel}) panicked before it got to mount its root: {deep_panic}
tried: {deep_tried}
answer: {deep_panic}, after {deep_when}
fix: the kernel's own message above names what it lacked on this host (a CPU feature, memory,
    a clock); give the VM what it asks for, or move to a host that has it
== deep-boot-reset UnsupportedError deep.boot (kernel_file, deep_milestones, console, deep_exits)
the engine's kernel ({boot_kernel}) reset {deep_when} into its boot, before its root-mount panic (a
    triple fault)
tried: {deep_tried}
answer: KVM_EXIT_SHUTDOWN after {deep_when}, with no panic on its console
fix: {deep_fix}
== deep-boot-timeout UnsupportedError deep.boot (kernel_file, deep_milestones, console, deep_exits)
the engine's kernel ({boot_kernel}) did not reach its root-mount panic within {deep_timeout} s
tried: {deep_tried}
answer: still running after {deep_timeout} s, at {deep_stop}; milestones: {deep_milestones}
fix: a good host boots it in well under a second: if this one is loaded or slow, allow more
    (--deep-timeout); otherwise the last console line says where the kernel waits
== native-missing InternalError checker
the native smoke test is not available: {note}
tried: load libkvmsmoke.so by absolute path
answer: {note}
fix: run `make` in the boxlite_syscheck directory, or set BOXLITE_SYSCHECK_KVMSMOKE to the
    absolute path of libkvmsmoke.so
== checker-failed InternalError checker
{note}; this says nothing about the host
tried: run the check
answer: {note}
fix: report it with the traceback (`python3 -X faulthandler -m boxlite_syscheck`)
"""


def _causes() -> dict[str, _Cause]:
    """The registry: _CAUSE_TABLE parsed (once, on first use), by key."""
    causes: dict[str, _Cause] = _cached("causes", _parse_causes)
    return causes


def _cause(key: str) -> _Cause:
    """One cause of the registry, its block alone parsed (a check that
    names one cause need not parse all of them)."""
    cause: _Cause | None = _CACHE.get("causes", {}).get(key)
    if cause is not None:
        return cause

    def parse() -> _Cause:
        start = _CAUSE_TABLE.find(f"\n== {key} ")
        if start < 0:
            raise KeyError(key)
        end = _CAUSE_TABLE.find("\n== ", start + 1)
        return _parse_block(_CAUSE_TABLE[start + 4 : end if end >= 0 else None])[1]

    found: _Cause = _cached(f"cause:{key}", parse)
    return found


def _parse_causes() -> dict[str, _Cause]:
    return dict(_parse_block(block) for block in _CAUSE_TABLE.split("\n== ")[1:])


def _parse_block(block: str) -> tuple[str, _Cause]:
    """One block of _CAUSE_TABLE, without its "== ": (key, cause)."""
    classes = {cls.__name__: cls for cls in BoxliteError.__subclasses__()}
    head, summary, *lines = block.strip().split("\n")
    key, cls, layer, *shown = head.split(maxsplit=3)
    fields = {"summary": summary, "shown": shown[0].strip("()") if shown else ""}
    name = "summary"
    for line in lines:
        if line.startswith("    "):
            fields[name] += " " + line.strip()
        else:
            name, _, value = line.partition(": ")
            fields[name] = value
    return key, _Cause(classes[cls], layer, fields)


def _denied(f: Facts) -> bool:
    """EACCES or EPERM where the node's mode lets this process in: a policy."""
    return f.failed(errno.EACCES, errno.EPERM) and (
        f.failed(errno.EPERM) or not f.opened() or _mode_lets_in(f.ev)
    )


def _missing_node(f: Facts) -> bool:
    return f.opened(errno.ENOENT)


def _no_access(f: Facts) -> bool:
    """EACCES on open and the node's mode (or its ACL) keeps this process out."""
    return f.opened(errno.EACCES) and not _mode_lets_in(f.ev)


def _contained(f: Facts) -> bool:
    """In a container or sandbox, or with a private /dev: the device is passed in."""
    return f.ev.runtime is not None or bool(f.ev.private_dev)


def _hv(f: Facts, code: int, source: str | None = None) -> bool:
    return f.hv is not None and f.hv[0] == code and source in (None, f.hv[1])


def _not_kvm(f: Facts) -> bool:
    """A call failed, on a node that is not character device 10:232."""
    return f.failed() and f.ev.node is not None and not f.ev.is_kvm_node()


def _unanswered(f: Facts) -> bool:
    """The node does not speak KVM's ioctls (whatever it is)."""
    odd = (errno.ENOTTY, errno.EINVAL, errno.EBADFD)
    return f.failed(*odd, step=STEP_API_VERSION) or f.failed(errno.ENOTTY, step=STEP_CREATE_VM)


def _gone(f: Facts, *names: str) -> bool:
    """No node (ENOENT), in one of these runtimes (any, when none is named)."""
    if not _missing_node(f):  # first: the runtime is read only when it matters
        return False
    return f.ev.runtime in names if names else f.ev.runtime is not None


def _driver_loaded(f: Facts) -> bool:
    if not _missing_node(f):  # first: the modules are read only when it matters
        return False
    return bool(f.ev.kvm_registered) or bool(set(_DRIVERS) & set(f.ev.kvm_modules))


def _has(f: Facts, flag: str) -> bool:
    return flag in (f.ev.cpu_flags or set())


def _pvm_ships(f: Facts) -> bool:
    return bool(f.ev.module_available.get("kvm_pvm"))


def _nodev(f: Facts) -> bool:
    return "nodev" in (f.ev.mount or {}).get("options", ())


def _userns_denied(f: Facts) -> bool:
    return _no_access(f) and f.ev.in_userns


def _no_group_bits(f: Facts) -> bool:
    """Access denied, and the node's mode gives no group read-write."""
    return _no_access(f) and not _perm_allows(int((f.ev.node or {}).get("mode", 0)) >> 3)


def _guest_failed(f: Facts, *kinds: str) -> bool:
    """A guest of one of these kinds ran and did not prove itself."""
    return f.smoke is not None and f.smoke.guest in kinds and not f.smoke.ok


def _no_proof(f: Facts) -> bool:
    expected = KVM_EXIT_MMIO if f.arch == "aarch64" else KVM_EXIT_HLT
    return (
        _guest_failed(f, "real-mode", "aarch64") and getattr(f.smoke, "exit_reason", -1) == expected
    )


def _timed_out(f: Facts) -> bool:
    return f.smoke is not None and f.smoke.timed_out


def _emulated(f: Facts) -> bool:
    return f.smoke is not None and bool(f.smoke.emulated)


def _msr_refused(f: Facts) -> bool:
    return f.smoke is not None and bool(f.smoke.msrs.get("boot_msr_refused"))


def _qemu_arch_msr(f: Facts) -> bool:
    arch = (f.smoke.msrs.get("arch_capabilities") or {}) if f.smoke else {}
    return f.engine == "qemu" and arch.get("accepted") is False


def _startup_failed(f: Facts) -> bool:
    return f.failure is not None and f.failure[0] in _STARTUP_STEPS.values()


def _deep_ended(f: Facts, outcome: str) -> bool:
    return f.deep is not None and f.deep.outcome == outcome


def _sysctl_is(f: Facts, name: str, value: int) -> bool:
    return f.mac and f.sysctl(name) == value


def _no_hvf(f: Facts) -> bool:
    return f.mac and f.sysctl("kern.hv_support") != 1


#: The rules, in order: the first whose predicate holds names the cause (a
#: key of CAUSES).  The probes gather facts in stages (open, capabilities,
#: start-up ioctls, guest, deep boot) and ask after each, so a rule on a
#: later stage's facts never overrides one the gate already stopped at.
RULES: tuple[tuple[str, Callable[[Facts], bool]], ...] = (
    ("platform-unsupported", lambda f: f.platform not in ("linux", "darwin")),
    # macOS: the machine, Hypervisor.framework, then what hv_vm_create said
    ("rosetta", lambda f: f.machine != "arm64" and _sysctl_is(f, "sysctl.proc_translated", 1)),
    ("macos-not-arm64", lambda f: f.mac and f.machine != "arm64"),
    ("hv-support-unreadable", lambda f: f.mac and isinstance(f.sysctl("kern.hv_support"), str)),
    ("hv-in-vm", lambda f: _no_hvf(f) and _sysctl_is(f, "kern.hv_vmm_present", 1)),
    ("hv-unsupported", _no_hvf),
    ("hv-no-resources", lambda f: _hv(f, HV_NO_RESOURCES)),
    ("hv-denied", lambda f: _hv(f, HV_DENIED, "process")),
    ("hv-denied/helper", lambda f: _hv(f, HV_DENIED, "engine")),
    ("hv-unsupported-code", lambda f: _hv(f, HV_UNSUPPORTED)),
    ("hv-busy", lambda f: _hv(f, HV_BUSY, "engine")),
    ("hv-engine-code", lambda f: f.hv is not None and f.hv[1] == "engine"),
    ("hv-other", lambda f: f.hv is not None and f.hv[0] not in (HV_SUCCESS, HV_BUSY)),
    ("hv-engine-error", lambda f: f.mac and f.message is not None and not f.entitled),
    # Linux: limits the process or the system hit, at any step
    ("fd-limit", lambda f: f.failed(errno.EMFILE)),
    ("system-file-limit", lambda f: f.failed(errno.ENFILE)),
    ("out-of-memory", lambda f: f.failed(errno.ENOMEM)),
    # Linux: what is at the path, and why it is missing
    ("kvm-wsl1", lambda f: _missing_node(f) and f.ev.wsl == "1"),
    ("kvm-missing-wsl", lambda f: _missing_node(f) and f.ev.wsl == "2"),
    ("kvm-not-kvm-device/bind", lambda f: _not_kvm(f) and bool(f.ev.bind_mounted)),
    ("kvm-not-kvm-device/container", lambda f: _not_kvm(f) and _contained(f)),
    ("kvm-not-kvm-device", _not_kvm),
    ("kvm-not-kvm-device/unanswered", _unanswered),
    ("kvm-missing-container/kubernetes", lambda f: _gone(f, "kubernetes")),
    ("kvm-missing-container/flatpak", lambda f: _gone(f, "flatpak")),
    ("kvm-missing-container/snap", lambda f: _gone(f, "snap")),
    ("kvm-missing-container/firejail", lambda f: _gone(f, "firejail")),
    ("kvm-missing-container/bubblewrap", lambda f: _gone(f, "bubblewrap")),
    ("kvm-missing-container/systemd-nspawn", lambda f: _gone(f, "systemd-nspawn")),
    ("kvm-missing-container/lxc", lambda f: _gone(f, "lxc")),
    ("kvm-missing-container", _gone),
    ("kvm-missing-container/service", lambda f: _missing_node(f) and bool(f.ev.private_dev)),
    ("kvm-node-missing", _driver_loaded),
    ("kvm-module-not-loaded", lambda f: _missing_node(f) and (_has(f, "vmx") or _has(f, "svm"))),
    ("kvm-no-el2", lambda f: _missing_node(f) and f.arch == "aarch64"),
    ("kvm-pvm-not-loaded", lambda f: _missing_node(f) and _has(f, "hypervisor") and _pvm_ships(f)),
    ("kvm-no-nested", lambda f: _missing_node(f) and _has(f, "hypervisor")),
    ("kvm-no-virtualization", _missing_node),
    ("kvm-no-driver/arm64", lambda f: f.opened(errno.ENXIO, errno.ENODEV) and f.arch == "aarch64"),
    ("kvm-no-driver", lambda f: f.opened(errno.ENXIO, errno.ENODEV)),
    # The node keeps this process out (EACCES on open)
    ("kvm-nodev", lambda f: f.opened(errno.EACCES) and _nodev(f)),
    ("kvm-userns/firejail", lambda f: _userns_denied(f) and f.ev.runtime == "firejail"),
    ("kvm-userns/unmapped-group", lambda f: _userns_denied(f) and f.ev.unmapped("gid")),
    ("kvm-userns", _userns_denied),
    ("kvm-acl-denies", lambda f: f.opened(errno.EACCES) and _acl_denier(f.ev) is not None),
    ("kvm-mode-no-group/no-kvm-group", lambda f: _no_group_bits(f) and not f.ev.kvm_group),
    ("kvm-mode-no-group", _no_group_bits),
    ("kvm-stale-session", lambda f: _no_access(f) and bool(f.ev.group_listed)),
    ("kvm-not-in-group/unnamed", lambda f: _no_access(f) and f.ev.group_named is False),
    ("kvm-not-in-group", _no_access),
    # A policy refused what the node's mode lets in (EPERM, EACCES)
    ("kvm-device-cgroup", lambda f: _denied(f) and _policy_candidates(f)[:1] == ["device cgroup"]),
    ("kvm-seccomp-denied", lambda f: _denied(f) and _sole_policy(f, "seccomp")),
    ("kvm-landlock-denied", lambda f: _denied(f) and _sole_policy(f, "Landlock")),
    ("kvm-selinux-denied", lambda f: _denied(f) and _sole_policy(f, "SELinux")),
    ("kvm-apparmor-denied", lambda f: _denied(f) and _sole_policy(f, "AppArmor")),
    ("kvm-flatpak-denied", lambda f: _denied(f) and _sole_policy(f, "flatpak")),
    ("kvm-snap-denied", lambda f: _denied(f) and _sole_policy(f, "snap")),
    ("kvm-access-policy", lambda f: _denied(f) and bool(_policy_candidates(f))),
    ("kvm-access-policy/unseen", _denied),
    ("kvm-open-failed", lambda f: f.opened()),
    # The device answers, but not as a VMM needs
    ("kvm-api-version", lambda f: f.failed(0, step=STEP_API_VERSION)),
    ("kvm-busy", lambda f: f.failed(errno.EBUSY, step=STEP_CREATE_VM)),
    ("kvm-capability-missing/seccomp", lambda f: bool(f.missing) and f.ev.seccomp == "2"),
    ("kvm-capability-missing", lambda f: bool(f.missing)),
    ("startup-ioctl-failed", _startup_failed),
    ("kvm-step-failed", lambda f: f.failed()),
    # The guest ran: what it showed
    ("smoke-timeout/arm64", lambda f: _timed_out(f) and f.arch == "aarch64"),
    ("smoke-timeout", _timed_out),
    ("guest-emulated-pvm", lambda f: _emulated(f) and f.ev.kvm_provider == "kvm_pvm"),
    ("guest-emulated", _emulated),
    ("smoke-no-proof", _no_proof),
    ("smoke-exit/arm64", lambda f: _guest_failed(f, "aarch64")),
    ("smoke-exit", lambda f: _guest_failed(f, "real-mode")),
    ("guest-instruction-failed", lambda f: _guest_failed(f, "long-mode")),
    ("msr-refused", _msr_refused),
    ("msr-arch-capabilities-refused", _qemu_arch_msr),
    # The engine's own kernel, booted (--deep)
    ("deep-boot-failed", lambda f: _deep_ended(f, BOOT_CALL_FAILED)),
    ("deep-boot-stopped", lambda f: _deep_ended(f, BOOT_STOPPED)),
    ("deep-boot-panicked", lambda f: _deep_ended(f, BOOT_PANICKED)),
    ("deep-boot-reset", lambda f: _deep_ended(f, BOOT_RESET)),
    ("deep-boot-timeout", lambda f: _deep_ended(f, BOOT_TIMED_OUT)),
    # An engine's error on a host that passes
    ("engine-error-decoded", lambda f: f.complete and f.platform == "linux" and bool(f.decoded)),
)


#: Runs of RULES (first and last key) whose every predicate needs a fact
#: that a check can lack: macOS's answers, an OS call that failed, a
#: capability KVM answered, a guest that did not pass (timed out, ran
#: emulated, or failed to prove itself), the MSRs a guest set, the deep
#: boot's result, and every stage answered (Facts.complete).  A block whose fact is absent cannot hold, so _diagnose does
#: not ask it.
_RULE_BLOCKS: dict[str, tuple[tuple[str, str], ...]] = {
    "macos": (("rosetta", "hv-engine-error"),),
    "failure": (("fd-limit", "kvm-busy"), ("startup-ioctl-failed", "kvm-step-failed")),
    "caps": (("kvm-capability-missing/seccomp", "kvm-capability-missing"),),
    "guest": (("smoke-timeout/arm64", "guest-instruction-failed"),),
    "msrs": (("msr-refused", "msr-arch-capabilities-refused"),),
    "deep": (("deep-boot-failed", "deep-boot-timeout"),),
    "complete": (("engine-error-decoded", "engine-error-decoded"),),
}


def _block_indices(name: str) -> set[int]:
    """The positions in RULES of a block's rules."""
    keys = [key for key, _ in RULES]
    return {
        i
        for first, last in _RULE_BLOCKS[name]
        for i in range(keys.index(first), keys.index(last) + 1)
    }


def _rules_without(*blocks: str) -> tuple[tuple[str, Callable[[Facts], bool]], ...]:
    """RULES in order, less the named blocks (made once per combination)."""
    rules: tuple[tuple[str, Callable[[Facts], bool]], ...]
    rules = _cached_in("rules-without", blocks, _rules_less, blocks)
    return rules


def _rules_less(blocks: tuple[str, ...]) -> tuple[tuple[str, Callable[[Facts], bool]], ...]:
    skipped = set().union(*map(_block_indices, blocks))
    return tuple(rule for i, rule in enumerate(RULES) if i not in skipped)


def _diagnose(facts: Facts) -> BoxliteError | None:
    """The one door to a cause: the first rule of RULES that holds, rendered.
    A block of rules whose facts are absent is not asked (it cannot hold)."""
    facts.pin()  # the rules read the first failure many times: find it once
    try:
        absent = []
        if not facts.mac and facts.hv is None:
            absent.append("macos")
        if facts.failure is None:
            absent.append("failure")
        if not facts.caps:
            absent.append("caps")
        smoke = facts.smoke
        if smoke is None or (smoke.ok and not smoke.timed_out and not smoke.emulated):
            absent.append("guest")
        if smoke is None or not smoke.msrs:
            absent.append("msrs")
        if facts.deep is None:
            absent.append("deep")
        if not facts.complete:
            absent.append("complete")
        for key, holds in _rules_without(*absent):
            if holds(facts):
                return _render(key, facts)
        return None
    finally:
        facts.unpin()


def _render(key: str, facts: Facts) -> BoxliteError:
    """The error for a cause: summary, Tried, Answer, evidence, Fix."""
    cause = _cause(key)
    try:
        return _worded(key, cause, _Values(facts))
    except _NoValue as missing:
        _log("warning", "cause %s: no value for %s", key, missing)
        return _worded(key, cause, _Values(facts, strict=False))


def _worded(key: str, cause: _Cause, values: _Values) -> BoxliteError:
    summary = cause.summary.format_map(values)
    tried, answer = cause.tried.format_map(values), cause.answer.format_map(values)
    fix = cause.fix.format_map(values)
    shown = {name: values.raw(name) for name in cause.shown}
    shown = {name: value for name, value in shown.items() if value not in (None, "")}
    lines = [summary, "", f"Tried: {tried}", f"Answer: {answer}"]
    lines += [f"{_LABELS[name]}: {value}" for name, value in shown.items()]
    lines += ["", f"Fix: {fix}"]
    evidence = {"tried": tried, "answer": answer, **shown}
    error = cause.cls("\n".join(lines), cause=key.split("/")[0], evidence=evidence, fix=fix)
    error._layer = cause.layer
    return error


_STAGES = ("caps", "ioctls", "smoke", "deep")


def _diagnose_staged(facts: Facts, after: str | None = None) -> BoxliteError | None:
    """What the gate would say of these facts: it asks after each stage
    (open, capabilities, start-up ioctls, guest, deep boot) and stops at the
    first cause, so a report that gathered everything says the same.
    ``after`` names the last stage a caller (the gate, as it goes) has
    already asked about with these same facts and found no cause: the
    questions up to it have their answer and are not asked twice."""
    if facts.failure is None:
        # Then the rules that can hold each read only their own stage, and
        # RULES lists them in the order of the stages: the first to hold in
        # one question of all the facts is the first the stages would meet.
        return _diagnose(facts)
    # An OS call failed, so a rule of the failure block (kvm-step-failed
    # at the least) holds at the stage that made it, if no earlier stage's
    # cause comes first: the questions end there, and the rule that needs
    # every stage answered (Facts.complete) is never asked here.
    done = 0 if after is None else _STAGES.index(after) + 1
    partial = facts.copy()
    for name in _STAGES[done:]:
        setattr(partial, name, None)
    partial.complete = False
    error = _diagnose(partial) if after is None else None
    for name in _STAGES[done:]:
        if error is not None:
            break
        value = getattr(facts, name)
        if value is not None:  # a stage without facts changes nothing
            setattr(partial, name, value)
            error = _diagnose(partial)
    return error


def _layer(error: BoxliteError | None) -> str | None:
    """The layer (a finding id, "engine" or "checker") an error fails."""
    return None if error is None else error._layer


# ── Engines: what each needs, probed on this host ───────────────────────────


def _all_caps(arch: str) -> tuple[str, ...]:
    """Every capability some engine asks about on ``arch``, and the limits."""
    names = {
        name
        for row in ENGINE_REQUIREMENTS.values()
        for kind in ("required", "optional")
        for name in row[kind].get(arch, ())
    }
    return tuple(sorted(names | set(_LIMIT_CAPS), key=lambda n: KVM_CAPS[n]))


def _kvm_answers(
    fd: int, names: Sequence[str], backend: str | None = None
) -> dict[str, int] | None:
    """None when the descriptor does not answer KVM_GET_API_VERSION with
    12; else KVM_CHECK_EXTENSION for each name: its value, or -errno when it
    failed.  Asked as operation arrays (one foreign call each with the
    native backend, not one per capability), the version first: each
    answer lands in a value slot, so an array asks _VALUE_SLOTS at most."""
    names = tuple(names)
    abi, runner = _abi(), _backend_for(backend)
    state, out = abi.State(), abi.Outcome()
    state.fds[:] = [fd] + [-1] * (_FD_SLOTS - 1)  # the arrays make no descriptors
    answers: dict[str, int] = {}
    for start in range(0, max(1, len(names)), _VALUE_SLOTS):
        chunk, first = names[start : start + _VALUE_SLOTS], start == 0
        ops, count = _cached_in("caps-ops", (first, chunk), _caps_plan, first, chunk)
        runner.execute(ops, count, state, out)
        if out.step >= 0:  # only the version is not asked softly
            return None
        answers.update(zip(chunk, out.values[: len(chunk)]))  # one list, not a lookup each
    return answers


def _caps_plan(first: bool, names: tuple[str, ...]) -> tuple[Any, int]:
    plan = _Plan()
    if first:
        version, check = KVM_GET_API_VERSION, _CHECK_EQ
        plan.ioctl(STEP_API_VERSION, _KVM, version, check=check, expect=KVM_API_VERSION)
    for slot, name in enumerate(names):
        cap, step = KVM_CAPS[name], STEP_CHECK_EXTENSION
        plan.ioctl(step, _KVM, KVM_CHECK_EXTENSION, cap, value=slot, soft=True)
    return plan.build()


def _release_later(release: Callable[[], None], fds: Sequence[int] = ()) -> None:
    """Release a throwaway VM's descriptors (``fds``) in the background:
    tearing down a VM with an in-kernel irqchip and PIT takes tens of
    milliseconds, which the check need not wait for.  In a program, one
    thread releases them (see _wait_for_closes); the command line keeps them
    for a helper process at exit (see _hand_off_at_exit).  Where neither can
    be had, they are released now."""
    held = _CACHE.get("held-for-exit")
    if held is not None:
        held.append((release, tuple(fds)))
        return
    # Past a backlog the thread is not keeping up (threads checking at once,
    # each holding the interpreter's lock in its turn): the VMs wait for it
    # no longer, or their descriptors would pile up to the caller's
    # RLIMIT_NOFILE and make our own checks say fd-limit.
    releaser = _teardown_thread()
    if releaser is None:
        release()
        return
    releaser.put(release)


def _hold_for_exit() -> None:
    """From now on, keep throwaway VMs for _hand_off_at_exit (the CLI)."""
    _CACHE.setdefault("held-for-exit", [])


def _hand_off_at_exit() -> None:
    """Release the VMs kept by _hold_for_exit, without waiting for their
    teardown: a helper process (_spawn_holder; nothing waits for it) takes
    its own copies of their descriptors, this process drops its references,
    and then the helper's exit is the last release and bears the teardown
    after this process is gone.  Without a helper (it could not be started)
    they are released here, paying the teardown."""
    held = _CACHE.pop("held-for-exit", None) or []
    if not held:
        return
    fds = sorted({fd for _, owned in held for fd in owned if fd >= 0})
    done = _spawn_holder(fds) if fds else None
    for release, _ in held:
        release()
    if done is not None:
        os.close(done)  # the helper reads end-of-file: its references are the last


def _spawn_holder(fds: Sequence[int]) -> int | None:
    """A detached process holding ``fds`` until the returned pipe end closes.

    It is this interpreter again (always there), started with posix_spawn:
    no copy of this process is made (a fork costs milliseconds here), and
    it is safe with threads running.  It reads its stdin, the pipe, until
    this process is gone.  None when it cannot be started."""
    if not sys.executable or not fds:
        return None
    try:
        wait_end, done = os.pipe2(os.O_CLOEXEC)
    except OSError:
        return None
    try:
        open_now = _open_fds()
        # The holder's copies go above every descriptor, so that no dup2
        # overwrites another's source; dup2 clears their close-on-exec.
        base = max([2, wait_end, done, *open_now]) + 1
        actions: list[tuple[Any, ...]] = [
            (os.POSIX_SPAWN_DUP2, wait_end, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),  # no reader waits for it
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        actions += [(os.POSIX_SPAWN_DUP2, fd, base + i) for i, fd in enumerate(fds)]
        # A descriptor this process inherited without close-on-exec (a pipe
        # someone reads to its end, say) must not outlive it in the holder.
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in open_now if fd > 2 and _inheritable(fd)]
        argv = [sys.executable, "-I", "-S", "-c", "import os\nos.read(0, 1)"]
        os.posix_spawn(sys.executable, argv, {}, file_actions=actions, setsid=True)
    except OSError as err:
        _log("debug", "no holder for the probe VMs: %s", err)
        os.close(done)
        return None
    finally:
        os.close(wait_end)
    return done


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:  # the listing's own descriptor, gone since
        return False


def _open_fds() -> list[int]:
    """This process's open descriptors."""
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3))


class _Releases:
    """The releasing thread's jobs: put() hands one over, join() waits until
    every job handed over has run.  Made of _thread's locks: queue and
    threading (with functools and collections) would cost a first gate
    milliseconds to import on a lean start."""

    def __init__(self) -> None:
        self.mutex = _thread.allocate_lock()
        self.wake = _thread.allocate_lock()  # held while there is nothing to do
        self.wake.acquire()
        self.jobs: list[Callable[[], None]] = []
        self.unfinished = 0
        self.waiters: list[Any] = []  # join()s waiting, each on a held lock
        self.held = False  # jobs wait for let_go() (see hold())

    def put(self, job: Callable[[], None]) -> None:
        with self.mutex:
            self.jobs.append(job)
            self.unfinished += 1
            if not self.held and self.wake.locked():
                self.wake.release()

    def hold(self) -> None:
        """Queue jobs without starting them until let_go(): a check's
        start-up VMs stay alive while its guest runs, as C doing the same
        work would have it, and no teardown runs beside the guest's runs
        and the speed probe (on a one-CPU host it would take the CPU).
        A hold that is never let go (a caller's exception between the two)
        lasts until the next check's let_go() or a join(), which both start
        what waits.  Holds are not counted for that reason: a count that a
        caller's exception left one too high would keep VMs alive for good.
        """
        self.held = True

    def let_go(self) -> None:
        with self.mutex:
            self._start_held()

    def _start_held(self) -> None:  # with the mutex
        self.held = False
        if self.jobs and self.wake.locked():
            self.wake.release()

    def work(self) -> None:
        # Every signal blocked here: a signal meant for the process that
        # this thread took would run the caller's handler in the main
        # thread at once, even where that thread blocks signals to store
        # a descriptor the kernel just returned (see _PythonBackend._owned).
        import ctypes

        failed = _sys_libc().pthread_sigmask(0, ctypes.byref(_all_signals()), None)  # SIG_BLOCK
        if failed:  # it returns the error number
            _log("warning", "the releasing thread could not block signals: %s", os.strerror(failed))
        while True:
            self.wake.acquire()
            with self.mutex:
                jobs, self.jobs = self.jobs, []
            for job in jobs:
                try:
                    job()
                except Exception as err:  # one failed release must not strand the rest
                    _log("warning", "releasing a throwaway VM failed: %s", err)
                finally:
                    with self.mutex:
                        self.unfinished -= 1
                        if not self.unfinished:
                            for waiter in self.waiters:
                                waiter.release()
                            self.waiters.clear()

    def join(self) -> None:
        with self.mutex:
            if not self.unfinished:
                return
            self._start_held()
            waiter = _thread.allocate_lock()
            waiter.acquire()
            self.waiters.append(waiter)
        waiter.acquire()


def _start_releaser() -> _Releases | None:
    """The releasing thread's jobs, or None when no thread can be started."""
    jobs = _Releases()
    try:
        _thread.start_new_thread(jobs.work, ())
    except RuntimeError:
        return None
    # A forked child has no such thread: it makes its own on first use.
    os.register_at_fork(after_in_child=lambda: _CACHE.pop("releaser", None))
    # A program that exits right after a check would otherwise finalize with
    # this thread inside a teardown: where libgcc_s is missing (a minimal
    # guest image) the daemon thread's exit aborts the process (SIGABRT).
    import atexit

    atexit.unregister(_wait_for_closes)  # a forked child's second thread: once
    atexit.register(_wait_for_closes)
    return jobs


class _HeldReleases:
    """``with _HeldReleases():`` holds the releasing thread for the block
    (see _Releases.hold) and lets it go however the block ends; nothing
    where a check's VMs do not go to the thread (the command line's)."""

    __slots__ = ("releaser",)

    def __enter__(self) -> None:
        self.releaser: _Releases | None = None
        if "held-for-exit" not in _CACHE:
            self.releaser = _cached("releaser", _start_releaser)
            if self.releaser is not None:
                self.releaser.hold()

    def __exit__(self, *exc: object) -> None:
        if self.releaser is not None:
            self.releaser.let_go()


def _wait_for_closes() -> None:
    """Wait until every VM handed to _release_later is released."""
    releaser = _CACHE.get("releaser")
    if releaser is not None:
        releaser.join()


# The start-up ioctls' arguments: the addresses QEMU and the rust-vmm
# engines use (below 4 GiB), a PIT with flags 0, and struct kvm_enable_cap
# for the split irqchip (cap, flags, args[0] = the IOAPIC pins it routes).


def _startup_args() -> dict[str, tuple[int, int, Any]]:
    import ctypes

    identity = ctypes.c_uint64(_IDENTITY_MAP_ADDR)
    pit = (ctypes.c_uint8 * _SIZEOF_KVM_PIT_CONFIG)()
    split = (ctypes.c_uint8 * _SIZEOF_KVM_ENABLE_CAP).from_buffer_copy(
        KVM_CAPS["SPLIT_IRQCHIP"].to_bytes(4, "little")
        + bytes(4)
        + (24).to_bytes(8, "little")
        + bytes(_SIZEOF_KVM_ENABLE_CAP - 16)
    )
    return {  # name: (request, argument, what the argument points into)
        "KVM_SET_IDENTITY_MAP_ADDR": (
            KVM_SET_IDENTITY_MAP_ADDR,
            ctypes.addressof(identity),
            identity,
        ),
        "KVM_SET_TSS_ADDR": (KVM_SET_TSS_ADDR, _TSS_ADDR, None),
        "KVM_CREATE_IRQCHIP": (KVM_CREATE_IRQCHIP, 0, None),
        "KVM_CREATE_PIT2": (KVM_CREATE_PIT2, ctypes.addressof(pit), pit),
        "KVM_ENABLE_CAP(SPLIT_IRQCHIP)": (KVM_ENABLE_CAP, ctypes.addressof(split), split),
    }


def _startup_wanted(names: Iterable[str]) -> tuple[str, ...]:
    """The start-up ioctls among ``names``, in the order they are made."""
    asked = set(names)
    return tuple(name for name in _STARTUP_STEPS if name in asked)


def _startup_ops(wanted: Sequence[str]) -> _Plan:
    """The start-up ioctls on throwaway VMs of their own, every operation
    soft: a VM that is not made leaves its ioctls answering EBADF, and the
    answers say "not tried" (_startup_answers).  KVM_CREATE_IRQCHIP and the
    split irqchip exclude each other, so the latter gets a VM of its own.
    The operations point only into the cached arguments, made once."""
    args = _cached("startup-args", _startup_args)
    plan = _Plan()
    made: set[int] = set()
    for index, name in enumerate(wanted):
        split = name == "KVM_ENABLE_CAP(SPLIT_IRQCHIP)"
        slot = _SPLIT_VM if split else _STARTUP_VM
        if slot not in made:  # each VM just before its first ioctl, in any order
            made.add(slot)
            value = _V_SPLIT_VM if split else _V_STARTUP_VM
            plan.ioctl(STEP_CREATE_VM, _KVM, KVM_CREATE_VM, 0, fd_out=slot, value=value, soft=True)
        request, arg, _ = args[name]
        plan.ioctl(_STARTUP_STEPS[name], slot, request, arg, value=_V_STARTUP + index, soft=True)
    return plan


def _startup_array(wanted: tuple[str, ...]) -> tuple[Any, int]:
    return _startup_ops(wanted).build()


def _startup_count(wanted: Sequence[str]) -> int:
    """The operations of _startup_ops(wanted): each ioctl, and each VM:
    one for the split irqchip, one for the others."""
    split = "KVM_ENABLE_CAP(SPLIT_IRQCHIP)" in wanted
    return len(wanted) + split + (len(wanted) > split)


def _startup_answers(wanted: Sequence[str], values: Any) -> dict[str, int]:
    """Each start-up ioctl's answer, read from the outcome's ``values`` after
    _startup_ops ran: 0 when it worked, its errno, or -1 when it was not
    tried (its VM was not made, or the PIT without the irqchip it needs)."""
    made = values[_V_STARTUP_VM : _V_STARTUP + len(wanted)]  # one list, not a lookup each
    vms = {False: made[0], True: made[1]}  # by "is it the split irqchip's VM"
    results = {
        name: -1 if vms[name == "KVM_ENABLE_CAP(SPLIT_IRQCHIP)"] < 0 else max(0, -answer)
        for name, answer in zip(wanted, made[2:])
    }
    if results.get("KVM_CREATE_IRQCHIP", 0) and "KVM_CREATE_PIT2" in results:
        results["KVM_CREATE_PIT2"] = -1  # it needs the in-kernel irqchip
    return results


def _probe_startup_ioctls(
    fd: int, names: Iterable[str], backend: str | None = None
) -> dict[str, int]:
    """The VM ioctls engines issue at start-up, on throwaway VMs, as an
    array of their own (_startup_ops; the gate makes them in its guest's
    first array instead): the answers of _startup_answers.  Either backend
    keeps the VMs' descriptors in its state from the moment the kernel
    returns them; they are released in the background."""
    wanted = _startup_wanted(names)
    if not wanted:
        return {}
    abi, runner = _abi(), _backend_for(backend)
    state, out = abi.State(), abi.Outcome()
    state.fds[:] = [fd] + [-1] * (_FD_SLOTS - 1)
    release = runner.releaser(state)
    ops, count = _cached_in("startup-ops", wanted, _startup_array, wanted)
    late: BaseException | None = None
    try:
        runner.execute(ops, count, state, out)
    finally:
        while True:  # as in _run_program: a caller's exception cannot leak the VMs
            try:
                _release_later(release, [int(fd) for fd in state.fds[1:]])
                break
            except BaseException as err:
                late = err
        if late is not None:
            raise late
    return _startup_answers(wanted, out.values)


#: Verdicts, from best to worst.
WOULD_RUN = "would run"
WOULD_FAIL_GUEST = "would start but its guest would fail"
WOULD_NOT_START = "would not start"
#: Each verdict as an identifier (the JSON's "state", the metrics' label).
ENGINE_STATES = {
    WOULD_RUN: "would-run",
    WOULD_FAIL_GUEST: "would-fail-guest",
    WOULD_NOT_START: "would-not-start",
}


def _verdict(facts: Facts, error: BoxliteError | None) -> dict[str, object]:
    """One engine's verdict (facts for that engine, and its diagnosis)."""
    assert facts.engine is not None
    row = ENGINE_REQUIREMENTS[facts.engine]
    caps, ioctls = facts.caps or {}, facts.ioctls or {}
    missing = facts.missing
    absent = [n for n in row["optional"].get(facts.arch, ()) if caps.get(n) == 0]
    failed = {n: errno.errorcode.get(code, str(code)) for n, code in ioctls.items() if code > 0}
    failed = {n: answer for n, answer in failed.items() if n in facts.engine_ioctls}
    untested = [n for n in facts.engine_ioctls if ioctls.get(n, -1) < 0]
    layer = _layer(error)
    if error is None:
        verdict, why = WOULD_RUN, ""
    elif layer is not None and (layer.startswith("guest.") or layer.startswith("deep.")):
        verdict, why = WOULD_FAIL_GUEST, error.summary
    else:
        verdict, why = WOULD_NOT_START, error.summary
    return {
        "verdict": verdict,
        "state": ENGINE_STATES[verdict],
        "why": why or None,
        "cause": error.cause if error is not None else None,
        "missing_capabilities": [{"name": n, "number": KVM_CAPS[n]} for n in missing],
        "optional_capabilities_absent": [{"name": n, "number": KVM_CAPS[n]} for n in absent],
        "failed_ioctls": failed,
        "untested_ioctls": untested,
        "boot": row["boot"],
        "devices": {
            purpose: facts.ev.once(_exists, node) for purpose, node in row["devices"].items()
        },
        "limits": {name.lower(): caps.get(name) for name in _LIMIT_CAPS},
    }


# ── Decoding what engines say ───────────────────────────────────────────────

# The shapes engines print (../shared/research/engine-requirements.md):
# Firecracker "Missing KVM capabilities: [0x24]", libkrun "Missing KVM
# capabilities: SetTssAddr", cloud-hypervisor "Capability missing: Irqchip",
# crosvm "missing required hypervisor capability ImmediateExit", QEMU "kvm
# does not support KVM_CAP_SET_TSS_ADDR"; errnos as "Error(13)", "os error 2",
# "code: 16", "failed: 16 Device or resource busy".
_ERRNO_PATTERNS = (r"Error\((\d+)\)", r"os error (\d+)", r"code: (\d+)", r"failed: (\d+) [A-Z]")
_CAP_ALIASES = {"ARM_PSCI02": "ARM_PSCI_0_2", "SET_IDENTITY_MAP_ADDRESS": "SET_IDENTITY_MAP_ADDR"}


def _cap_from_rust_name(word: str) -> str | None:
    """ "SetTssAddr" -> "SET_TSS_ADDR", when that is a capability we know."""
    import re

    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", word).upper()
    name = _CAP_ALIASES.get(name, name)
    return name if name in KVM_CAPS else None


# What BoxLite and libkrun write when a VM dies, and what each means.
_ENGINE_LINES = (
    (r"KVM_EXIT_([A-Z_]+)", "the engine's vCPU stopped with KVM_EXIT_{0}"),
    (
        r"kvm-pvm: ([A-Z_]+) in batch emul: rip=(0x[0-9a-f]+)",
        "kvm_pvm's instruction emulator failed ({0}) at guest RIP {1}",
    ),
    (r"KVM is not available on this host", "BoxLite's own check found no usable /dev/kvm"),
    (r"KVM is available but access is denied", "BoxLite's own check was refused /dev/kvm"),
)
# BoxLite's display prefixes, and the SDK code of each (0.9 raised them all
# as RuntimeError; a PanicException carries one inside its text).
_SDK_PREFIXES = {cls.prefix: cls.code for cls in BoxliteError.__subclasses__() if cls.code}
# Codes of failures that are not the host's: the original comes back.
_NOT_HOST_CODES = frozenset(
    "storage_error image_pull_failed config_error network_unavailable database_error "
    "metadata_error not_found already_exists invalid_state invalid_argument execution_failed "
    "stopped session_reaped upstream_unavailable".split()
)
# Words that tie an error's text to KVM, the VM or the hypervisor.
_HOST_WORDS = (
    r"\bkvm\b|/dev/kvm|KVM_|hypervisor|\bHV_[A-Z]+|hv_vm_create|virtuali[sz]ation|VM failed to "
    r"start|VmCreate|VmBoot|KvmNew|krun_start_enter|Capability missing|vcpu"
)


def _sdk_code(error: BaseException) -> str | None:
    """The SDK's code for an error: its own ``code``, or the code of the
    BoxLite display prefix its text starts a line with (0.9, panics)."""
    import re

    code = getattr(error, "code", None)
    if isinstance(code, str):
        return code
    for line in str(error).splitlines():
        for prefix, known in _SDK_PREFIXES.items():
            if re.match(re.escape(prefix), line.strip()):
                return known
    return None


def _host_fault(error: BaseException) -> bool:
    """Whether an engine's error is about the host (KVM, the device, the VM
    start, the hypervisor) rather than images, storage, configuration,
    networking, the database or the guest agent."""
    import re

    if isinstance(error, BoxliteError) and error.cause:  # ours: its cause says
        return _layer(error) not in (None, "checker")
    code = _sdk_code(error)
    if code in _NOT_HOST_CODES or type(error).__name__ == "TimeoutError":
        return False
    return code == "engine_unavailable" or bool(re.search(_HOST_WORDS, str(error), re.I))


def decode_engine_message(message: str) -> list[str]:
    """Name the capability numbers, capability names, errno values and exits
    in an engine's error message or log: ["KVM_CAP_IOEVENTFD (36) is
    missing", "errno 13 is EACCES (Permission denied)", ...]."""
    import re

    found: list[str] = []
    caps: list[str] = []
    for listing in re.findall(r"[Mm]issing KVM capabilities:\s*\[([^\]]*)\]", message):
        for number in re.findall(r"0x[0-9a-fA-F]+|\d+", listing):
            value = int(number, 0)
            caps.append(KVM_CAP_NAMES.get(value, f"unknown capability {value}"))
    named = (
        r"(?:[Mm]issing KVM capabilities:|Capability missing:|missing required hypervisor "
        r"capability)\s*([A-Za-z][A-Za-z0-9]*)"
    )
    for word in re.findall(named, message):
        name = _cap_from_rust_name(word)
        if name:
            caps.append(name)
    caps += re.findall(r"KVM_CAP_([A-Z0-9_]+)", message)
    for name in dict.fromkeys(caps):
        label = f"KVM_CAP_{name} ({KVM_CAPS[name]})" if name in KVM_CAPS else name
        found.append(f"{label} is missing")
    for pattern in _ERRNO_PATTERNS:
        for number in re.findall(pattern, message):
            value = int(number)
            text = f"errno {value} is {errno_name(value)}"
            if value in errno.errorcode and text not in found:
                found.append(text)
    for pattern, meaning in _ENGINE_LINES:
        for match in re.finditer(pattern, message):
            text = meaning.format(*match.groups())
            if text not in found:
                found.append(text)
    return found


# ── The deep proof: boot the engine's own kernel ────────────────────────────

#: The deep boot's default bound, in seconds: a good host needs well under
#: one; an emulating one fails within about ten.
DEEP_TIMEOUT = 30.0
MAX_DEEP_TIMEOUT = 600.0
#: The kernel's command line: reset at the root-mount panic (a triple-fault
#: reset, so no keyboard controller is polled), the VGA text console, no
#: port-0x80 delays (there is no ISA bus to slow down; each would be an
#: exit), and no cursor drawn: the console hides its cursor before each
#: line and draws it after, and each change of its shape reads two CRTC
#: registers back, about 980 reads in a boot, each an exit to us, where
#: the console's writes stay in KVM's coalesced ring.
BOOT_CMDLINE = "console=tty0 reboot=t panic=-1 io_delay=none vt.global_cursor_default=0"
# Guest physical layout, as Firecracker's: the boot GDT, the zero page
# (struct boot_params), the stack, identity page tables (2 MiB pages over the
# first GiB), the command line; the VGA text buffer; the kernel at its load
# address.  Guest memory is at least _BOOT_MEM_MIN (libkrunfw needs 48 MiB).
_BOOT_GDT, _BOOT_ZERO_PAGE, _BOOT_STACK = 0x500, 0x7000, 0x8FF0
_BOOT_PML4, _BOOT_PDPT, _BOOT_PD, _BOOT_CMDLINE_AT = 0x9000, 0xA000, 0xB000, 0x20000
_BOOT_LOW = 0x21000  # the bytes of low memory the boot image fills
_VGA_TEXT, _VGA_SIZE = 0xB8000, 0x8000
_BOOT_MEM_MIN, _BOOT_MEM_MAX = 64 << 20, 1 << 30
_KVM_MP_STATE_HALTED = 3
_START_KERNEL_MAP = 0xFFFFFFFF80000000
# struct boot_params offsets (arch/x86/include/uapi/asm/bootparam.h).
_BP_E820_ENTRIES, _BP_SETUP, _BP_E820_TABLE = 0x1E8, 0x1F1, 0x2D0
_E820_RAM = 1
#: What the kernel prints on its way, as milestones: (name, as said, text).
BOOT_MARKERS = (
    ("version", "Linux version", b"Linux version "),
    ("calibrating", "Calibrating delay", b"Calibrating delay"),
    ("panic", "Kernel panic", b"Kernel panic - not syncing"),
    ("root-mount", "root-mount panic", b"VFS: Unable to mount root fs"),
)
_MILESTONE_NAMES = {
    "loaded": "kernel loaded",
    "first-output": "first output",
    **{name: said for name, said, _ in BOOT_MARKERS},
    "reset": "reset",
}


class Kernel:
    """A kernel to direct-boot: its file, format, version, and where it loads
    and starts.  ``kind`` is "libkrunfw" (the engine's library: the kernel's
    loadable segments, raw), "elf" (a vmlinux) or "bzimage" (entered at its
    64-bit entry, load address + 0x200).  ``close()`` releases the file."""

    def __init__(
        self,
        path: str,
        kind: str,
        load: int,
        entry: int,
        end: int,
        *,
        version: str | None = None,
        setup: bytes = b"",
    ) -> None:
        self.path, self.kind = path, kind
        self.load, self.entry, self.end = load, entry, end
        self.version = version
        #: bzImage: its setup header, which goes into the zero page.
        self.setup = setup
        self._copy: Callable[[Any, int], None] = lambda mem, addr: None
        self._close: Callable[[], None] = lambda: None

    def copy_into(self, mem: Any, addr: int) -> None:
        """Copy the kernel into guest memory (``mem``, mapped at ``addr``)."""
        self._copy(mem, addr)
        if self.version is None:  # the banner the kernel prints, from its own bytes
            at = mem.find(b"Linux version ", self.load, self.end)
            if at >= 0:
                self.version = (
                    bytes(mem[at + 14 : at + 78]).split(b" ")[0].decode("ascii", "replace")
                )

    def close(self) -> None:
        close, self._close = self._close, lambda: None
        close()

    def describe(self) -> str:
        name = f"Linux {self.version}" if self.version else "a Linux kernel"
        return f"{name}, {self.kind}"

    def __repr__(self) -> str:
        return f"<Kernel {self.describe()} {self.path}>"


def open_kernel(path: str) -> Kernel:
    """The kernel in ``path``: libkrunfw's shared library (loaded by absolute
    path, for krunfw_get_kernel), an ELF vmlinux, or a bzImage.  Raises
    InvalidArgumentError for a file that is none of them.  The file stays
    open (the library loaded) until the kernel's close()."""
    real = os.path.realpath(path)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise InvalidArgumentError(
            f"kernel {path}: cannot be read: {errno_name(_errno_of(err))}"
        ) from None
    try:
        head = os.pread(fd, 4096, 0)
        if head[:4] == b"\x7fELF" and len(head) >= 64:
            if head[4] != 2 or int.from_bytes(head[18:20], "little") != 62:
                raise InvalidArgumentError(f"kernel {path}: an ELF file, but not a 64-bit x86 one")
            kind = int.from_bytes(head[16:18], "little")
            if kind == 3:  # a shared object: libkrunfw
                os.close(fd)
                fd = -1
                return _libkrunfw_kernel(path, real)
            if kind == 2:
                kernel = _elf_kernel(path, real, fd, head)
                fd = -1
                return kernel
        elif head[0x202:0x206] == b"HdrS" and head[0x1FE:0x200] == b"\x55\xaa":
            kernel = _bzimage_kernel(path, real, fd, head)
            fd = -1
            return kernel
        raise InvalidArgumentError(
            f"kernel {path}: not libkrunfw's library, an ELF vmlinux or a bzImage"
        )
    finally:
        if fd >= 0:
            os.close(fd)


def _libkrunfw_kernel(path: str, real: str) -> Kernel:
    import ctypes

    try:
        lib = _load_library(real)
        get = lib.krunfw_get_kernel
    except (OSError, AttributeError) as err:
        raise InvalidArgumentError(f"kernel {path}: not libkrunfw ({err})") from None
    # char *krunfw_get_kernel(size_t *load_addr, size_t *entry_addr, size_t *size)
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.POINTER(ctypes.c_size_t)] * 3
    load, entry, size = ctypes.c_size_t(), ctypes.c_size_t(), ctypes.c_size_t()
    start = get(ctypes.byref(load), ctypes.byref(entry), ctypes.byref(size))
    kernel = Kernel(path, "libkrunfw", load.value, entry.value, load.value + size.value)

    def copy(mem: Any, addr: int) -> None:
        ctypes.memmove(addr + kernel.load, start, kernel.end - kernel.load)

    def close() -> None:
        import _ctypes

        _ctypes.dlclose(lib._handle)  # its 20 MB go now

    kernel._copy, kernel._close = copy, close
    if not start or not 0x100000 <= kernel.load < kernel.end <= _BOOT_MEM_MAX:
        kernel.close()
        raise InvalidArgumentError(f"kernel {path}: libkrunfw gave no usable kernel")
    return kernel


def _u(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size], "little")


def _elf_kernel(path: str, real: str, fd: int, head: bytes) -> Kernel:
    """A vmlinux: its PT_LOAD segments at their physical addresses."""
    phoff, size, count = _u(head, 32, 8), _u(head, 54, 2), _u(head, 56, 2)
    table = os.pread(fd, size * count, phoff)
    segments = []
    for i in range(count):
        ph = table[i * size : (i + 1) * size]
        if _u(ph, 0, 4) == 1 and _u(ph, 40, 8):  # PT_LOAD with memory
            segments.append((_u(ph, 8, 8), _u(ph, 24, 8), _u(ph, 32, 8), _u(ph, 40, 8)))
    if not segments:
        raise InvalidArgumentError(f"kernel {path}: an ELF file without loadable segments")
    entry = _u(head, 24, 8)
    entry -= _START_KERNEL_MAP if entry >= _START_KERNEL_MAP else 0
    pieces = [(offset, paddr, filesz) for offset, paddr, filesz, _ in segments]
    end = max(paddr + memsz for _, paddr, _, memsz in segments)
    return _file_kernel(path, "elf", fd, pieces, entry, end)


def _file_kernel(
    path: str,
    kind: str,
    fd: int,
    pieces: list[tuple[int, int, int]],
    entry: int,
    end: int,
    setup: bytes = b"",
) -> Kernel:
    """A kernel read from its file: (file offset, guest address, size) pieces,
    read straight into guest memory; the file closes with the kernel."""
    load = min(paddr for _, paddr, _ in pieces)
    if not 0x100000 <= load < end <= _BOOT_MEM_MAX:
        raise InvalidArgumentError(
            f"kernel {path}: loads at {load:#x}-{end:#x}, outside 1 MiB-1 GiB"
        )
    kernel = Kernel(path, kind, load, entry, end, setup=setup)

    def copy(mem: Any, addr: int) -> None:
        view = memoryview(mem)
        try:
            for offset, paddr, size in pieces:
                _read_fully(fd, view[paddr : paddr + size], offset)
        finally:
            view.release()

    kernel._copy, kernel._close = copy, lambda: os.close(fd)
    return kernel


def _bzimage_kernel(path: str, real: str, fd: int, head: bytes) -> Kernel:
    """A bzImage: its protected-mode part at the preferred address, entered
    at the 64-bit entry (+0x200); the setup header goes into the zero page."""
    version = _u(head, 0x206, 2)
    if version < 0x20C or not _u(head, 0x236, 2) & 1:  # XLF_KERNEL_64
        raise InvalidArgumentError(f"kernel {path}: a bzImage without a 64-bit entry")
    setup_sects = head[0x1F1] or 4
    start = (setup_sects + 1) * 512
    size = os.fstat(fd).st_size - start
    load = _u(head, 0x258, 8) or 0x1000000
    end = load + max(size, _u(head, 0x260, 4))
    named = _u(head, 0x20E, 2)
    text = head[0x200 + named : 0x200 + named + 64].split(b"\0")[0] if named else b""
    setup = head[_BP_SETUP : 0x202 + head[0x201]]
    kernel = _file_kernel(path, "bzimage", fd, [(start, load, size)], load + 0x200, end, setup)
    kernel.version = text.split(b" ")[0].decode("ascii", "replace") or None
    return kernel


def _read_fully(fd: int, into: memoryview, offset: int) -> None:
    """Read into guest memory straight from the file (no copy in between)."""
    done = 0
    while done < len(into):
        got = os.preadv(fd, [into[done:]], offset + done)
        if got == 0:
            raise InvalidArgumentError("the kernel file ends before its segments do")
        done += got


def boxlite_kernels() -> tuple[list[str], str]:
    """The libkrunfw libraries BoxLite extracted, newest first, and where
    they were looked for ($XDG_DATA_HOME/boxlite/runtimes)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    where = os.path.join(base, "boxlite", "runtimes")
    found = []
    try:
        runtimes = os.listdir(where)
    except OSError:
        return [], where
    for name in runtimes:
        if ".extracting." in name:  # an extraction under way, or abandoned
            continue
        folder = os.path.join(where, name)
        try:
            libraries = [n for n in os.listdir(folder) if n.startswith("libkrunfw.so")]
            found += [
                (os.stat(os.path.join(folder, n)).st_mtime, os.path.join(folder, n))
                for n in libraries
            ]
        except OSError:
            continue
    return [path for _, path in sorted(found, reverse=True)], where


class BootResult:
    """How far the engine's kernel got in a throwaway VM: milestones (seconds
    from VM creation), how it ended (``outcome``), where it stopped, what it
    printed, and the exits KVM made."""

    def __init__(self, backend: str, timeout: float = DEEP_TIMEOUT) -> None:
        self.backend: str = backend
        self.timeout: float = timeout
        self.outcome: str = BOOT_NOT_RUN
        self.kernel: str | None = None
        self.kernel_path: str | None = None
        self.note: str = ""  # why it did not run
        self.mem_size: int = 0
        self.milestones: dict[str, float] = {}
        self.exits: dict[str, int] = {}
        #: Port IO by port, as the kernel made it: the exits, and the writes
        #: KVM kept in its coalesced ring instead (``coalesced`` of them).
        self.ports: dict[int, int] = {}
        self.coalesced: int = 0
        #: "on", or why KVM could not keep the console's port writes.
        self.coalescing: str = "off: not asked"
        self.exit_reason: int = -1
        self.internal_suberror: int = 0
        self.hardware_entry_failure_reason: int = 0
        self.insn_bytes: bytes = b""
        self.rip: int = -1
        #: Whether the vCPU waited halted (for an interrupt) where it stopped.
        self.halted: bool | None = None
        self.instruction: str | None = None
        self.console: str | None = None
        self.panic: str | None = None
        self.step: int = STEP_DONE
        self.error: int = 0
        self.elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome == BOOTED

    @property
    def exit_count(self) -> int:
        return sum(self.exits.values())

    def stop_text(self) -> str:
        """Where it stopped: the exit, the RIP and the instruction there."""
        text = exit_name(self.exit_reason) if self.exit_reason >= 0 else "no exit"
        if self.exit_reason == KVM_EXIT_INTERNAL_ERROR:
            name = INTERNAL_SUBERRORS.get(self.internal_suberror, "UNLISTED")
            text += f", suberror {name} ({self.internal_suberror})"
        elif self.exit_reason == KVM_EXIT_FAIL_ENTRY:
            text += f", hardware entry failure reason {self.hardware_entry_failure_reason:#x}"
        if self.rip >= 0:
            text += f" at RIP {self.rip:#x}"
        if self.instruction:
            text += f": {self.instruction}"
        if self.insn_bytes:
            text += f" (bytes {self.insn_bytes.hex(' ')})"
        if self.halted:
            text += ", halted waiting for an interrupt"
        return text

    def milestones_text(self) -> str:
        return (
            ", ".join(
                f"{_MILESTONE_NAMES[name]} at {at:.2f} s" for name, at in self.milestones.items()
            )
            or "none"
        )

    def exits_text(self) -> str:
        return ", ".join(f"{name} {count}" for name, count in self.exits.items()) or "none"

    def as_dict(self) -> dict[str, object]:
        return {
            "outcome": self.outcome,
            "kernel": self.kernel,
            "kernel_path": self.kernel_path,
            "note": self.note or None,
            "backend": self.backend,
            "timeout_s": self.timeout,
            "guest_memory_bytes": self.mem_size,
            "milestones_s": {name: round(at, 4) for name, at in self.milestones.items()},
            "exit": exit_name(self.exit_reason) if self.exit_reason >= 0 else None,
            "internal_suberror": self.internal_suberror or None,
            "rip": f"{self.rip:#x}" if self.rip >= 0 else None,
            "instruction": self.instruction,
            "halted": self.halted,
            "insn_bytes": self.insn_bytes.hex(" ") or None,
            "console": self.console,
            "panic": self.panic,
            "exits": dict(self.exits),
            "kvm_exits": self.exit_count,
            "coalesced_writes": self.coalesced,
            "coalescing": self.coalescing,
            "io_ports": {
                f"{port:#x}": count
                for port, count in sorted(self.ports.items(), key=lambda item: -item[1])[:8]
            },
            "elapsed_s": round(self.elapsed, 4),
            "step": STEP_NAMES[self.step] if self.step != STEP_DONE else None,
            "errno": errno.errorcode.get(self.error) if self.error else None,
        }

    def __repr__(self) -> str:
        return f"<BootResult {self.outcome} {self.kernel}, {self.exit_count} exits>"


def _boot_memory(kernel: Kernel) -> int:
    """Guest memory for the kernel: what it needs, in whole 16 MiB, at least 64 MiB."""
    wanted = -(-(kernel.end * 3 // 2) // (16 * _MIB)) * 16 * _MIB
    return min(max(_BOOT_MEM_MIN, wanted), _BOOT_MEM_MAX)


def _zero_page(kernel: Kernel, mem_size: int) -> bytes:
    """struct boot_params for the 64-bit boot protocol: the setup header
    (a bzImage's own), an 80x25 VGA text screen, the e820 map, the command line."""
    page = bytearray(4096)

    def put(offset: int, size: int, value: int) -> None:
        page[offset : offset + size] = value.to_bytes(size, "little")

    page[_BP_SETUP : _BP_SETUP + len(kernel.setup)] = kernel.setup
    # screen_info: orig_video_mode 3, 80 columns, 25 lines, VGA, 16-line font.
    put(0x06, 1, 3)
    put(0x07, 1, 80)
    put(0x0E, 1, 25)
    put(0x0F, 1, 1)
    put(0x10, 2, 16)
    put(0x1FE, 2, 0xAA55)  # boot_flag
    put(0x202, 4, 0x53726448)  # "HdrS"
    put(0x210, 1, 0xFF)  # type_of_loader: undefined
    put(0x211, 1, page[0x211] | 0x01)  # loadflags: LOADED_HIGH
    put(0x228, 4, _BOOT_CMDLINE_AT)  # cmd_line_ptr
    put(0x230, 4, 0x1000000)  # kernel_alignment
    put(0x238, 4, len(BOOT_CMDLINE))  # cmdline_size
    if not kernel.setup:
        put(0x206, 2, 0x020C)  # version: the 64-bit boot protocol
    e820 = ((0, 0x9FC00), (0x100000, mem_size - 0x100000))
    put(_BP_E820_ENTRIES, 1, len(e820))
    for i, (start, size) in enumerate(e820):
        at = _BP_E820_TABLE + 20 * i
        put(at, 8, start)
        put(at + 8, 8, size)
        put(at + 16, 4, _E820_RAM)
    return bytes(page)


def _boot_guest(kernel: Kernel, mem_size: int) -> _Guest:
    """Low memory for the boot (GDT, zero page, page tables, command line)
    and the long-mode state a direct-boot VMM enters Linux with."""
    image = bytearray(_BOOT_LOW)
    gdt = [0, 0, _gdt_entry(_GDT_CODE64, 0, 0xFFFFF), _gdt_entry(_GDT_DATA64, 0, 0xFFFFF)]
    for i, entry in enumerate(gdt):
        image[_BOOT_GDT + 8 * i : _BOOT_GDT + 8 * i + 8] = entry.to_bytes(8, "little")
    image[_BOOT_ZERO_PAGE : _BOOT_ZERO_PAGE + 4096] = _zero_page(kernel, mem_size)
    image[_BOOT_PML4 : _BOOT_PML4 + 8] = (_BOOT_PDPT | _KERNPG_TABLE).to_bytes(8, "little")
    image[_BOOT_PDPT : _BOOT_PDPT + 8] = (_BOOT_PD | _KERNPG_TABLE).to_bytes(8, "little")
    for i in range(512):  # 2 MiB pages: the first GiB, identity-mapped
        entry = (i << 21) | _PAGE_KERNEL_LARGE
        image[_BOOT_PD + 8 * i : _BOOT_PD + 8 * i + 8] = entry.to_bytes(8, "little")
    cmdline = BOOT_CMDLINE.encode() + b"\0"
    image[_BOOT_CMDLINE_AT : _BOOT_CMDLINE_AT + len(cmdline)] = cmdline
    sregs = _long_mode_sregs(_BOOT_GDT, len(gdt), _BOOT_PML4)
    regs = {
        "rip": kernel.entry,
        "rsp": _BOOT_STACK,
        "rbp": _BOOT_STACK,
        "rsi": _BOOT_ZERO_PAGE,
        "rflags": 0x2,
    }
    return _Guest("kernel", bytes(image), mem_size, kernel.entry, sregs, regs)


class _BootPorts:
    """The little port IO a kernel needs answered: CMOS reads 0 (as libkrun's
    device answers; 0xff makes rtc_cmos poll for seconds), the UART's LSR
    says it can send and what it sends is kept, the VGA CRTC keeps its
    registers (the cursor says where the console's last line is), and
    everything else reads as nothing there (0xff)."""

    def __init__(self) -> None:
        self.crtc_index = 0
        self.crtc = bytearray(32)
        self.uart = bytearray()

    def read(self, port: int, size: int) -> bytes:
        if port == 0x71:
            return bytes(size)
        if port == 0x3FD:
            return b"\x60" + b"\xff" * (size - 1)
        if port == 0x3D5:
            return bytes([self.crtc[self.crtc_index & 0x1F]]) + b"\xff" * (size - 1)
        return b"\xff" * size

    def write(self, port: int, data: bytes) -> None:
        if port == 0x3D4:
            self.crtc_index = data[0]
            if len(data) > 1:  # outw: index and value at once
                self.crtc[data[0] & 0x1F] = data[1]
        elif port == 0x3D5:
            self.crtc[self.crtc_index & 0x1F] = data[0]
        elif port == 0x3F8 and len(self.uart) < 1 << 16:
            self.uart += data


#: The port writes KVM keeps in its coalesced ring rather than exiting to
#: us (writes only: a read still exits, with the ring drained first), as
#: QEMU asks for VGA: the CRTC index/data pair, which the console's cursor
#: position and scrolling write about 1,700 times in a libkrunfw boot, and
#: the attribute and palette registers.  (port, count) zones.
_BOOT_COALESCED_PORTS = ((0x3D4, 2), (0x3C0, 10))
#: struct kvm_coalesced_mmio_ring: first, last, then entries of
#: struct kvm_coalesced_mmio (phys_addr, len, pio, data[8]) filling its page.
_RING_HEAD, _RING_ENTRY, _RING_PAGE = 8, 24, 4096
_RING_ENTRIES = (_RING_PAGE - _RING_HEAD) // _RING_ENTRY  # KVM_COALESCED_MMIO_MAX


#: The longest one KVM_RUN of the boot lasts, so that the console is read
#: for its milestones while the kernel prints: most of its port writes no
#: longer exit.
_BOOT_SLICE_NS = 20_000_000


def _coalesce_console(session: _Session) -> tuple[int, str]:
    """Register _BOOT_COALESCED_PORTS on the boot's VM: the ring's address
    in the vCPU's mapped area (0 when KVM keeps none), and "on" or why not."""
    import ctypes

    state = session.state
    kvm, vm = int(state.fds[_KVM]), int(state.fds[_VM])
    try:
        if _ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAPS["COALESCED_PIO"]) <= 0:
            return 0, "off: KVM_CAP_COALESCED_PIO is 0"
        page = _ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAPS["COALESCED_MMIO"])
    except _SysError as err:
        return 0, f"off: KVM_CHECK_EXTENSION answered {errno_name(err.errno or 0)}"
    if page <= 0 or (page + 1) * _RING_PAGE > state.run_size:
        return 0, f"off: the ring's page {page} is outside the vCPU's {state.run_size} bytes"
    ring = state.run_addr + page * _RING_PAGE
    for i, (port, count) in enumerate(_BOOT_COALESCED_PORTS):
        zone = (ctypes.c_uint64 * 2)(port, count | 1 << 32)  # addr; size, pio = 1
        try:
            _ioctl(vm, KVM_REGISTER_COALESCED_MMIO, ctypes.addressof(zone))
        except _SysError as err:
            said = f"KVM_REGISTER_COALESCED_MMIO {port:#x} answered {errno_name(err.errno or 0)}"
            return (ring, f"partly: {said}") if i else (0, f"off: {said}")
    return ring, "on"


def _drain_ring(ring: int, ports: _BootPorts, result: BootResult) -> None:
    """Apply the port writes KVM kept in the ring, oldest first, and empty
    it.  Called whenever KVM_RUN returns, before its exit is answered, so
    the ports see every write in the order the kernel made it (the vCPU is
    stopped: nothing writes the ring meanwhile)."""
    import ctypes
    import struct

    first, last = struct.unpack("<II", ctypes.string_at(ring, _RING_HEAD))
    if first == last or max(first, last) >= _RING_ENTRIES:  # empty (KVM writes no other)
        return
    page = ctypes.string_at(ring, _RING_PAGE)
    counts = result.ports
    kept = 0
    while first != last:
        at = _RING_HEAD + first * _RING_ENTRY
        port, size = struct.unpack_from("<QI", page, at)
        ports.write(port, page[at + 16 : at + 16 + min(size, 8)])
        counts[port] = counts.get(port, 0) + 1
        kept += 1
        first = (first + 1) % _RING_ENTRIES
    result.coalesced += kept
    ctypes.memmove(ring, first.to_bytes(4, "little"), 4)


class _BootConsole:
    """What the kernel printed, read from VGA text memory (and the UART),
    and when each milestone first showed."""

    def __init__(self, mem_addr: int, ports: _BootPorts, start_ns: int, result: BootResult) -> None:
        self.mem_addr, self.ports, self.start_ns, self.result = mem_addr, ports, start_ns, result
        self.last_ns = 0
        self.pending = list(BOOT_MARKERS)

    def text(self) -> bytes:
        import ctypes

        vga = b""
        if self.result.mem_size >= _VGA_TEXT + _VGA_SIZE:  # guest memory holds the buffer
            vga = ctypes.string_at(self.mem_addr + _VGA_TEXT, _VGA_SIZE)[0::2]
        return vga + b"\n" + bytes(self.ports.uart)

    def scan(self, now_ns: int, force: bool = False) -> None:
        """Look for milestones, at most once a millisecond (and at the end)."""
        if not force and now_ns - self.last_ns < 1_000_000:
            return
        self.last_ns = now_ns
        at = (now_ns - self.start_ns) / 1e9
        text = self.text()
        milestones = self.result.milestones
        if "first-output" not in milestones and text.strip(b"\0 \n"):
            milestones["first-output"] = at
        for marker in list(self.pending):
            if text.find(marker[2]) >= 0:
                milestones[marker[0]] = at
                self.pending.remove(marker)

    def finish(self) -> None:
        """The panic line and the last line the console shows."""
        import re

        text = self.text().replace(b"\0", b" ")
        at = text.find(b"Kernel panic - not syncing")
        if at >= 0:
            line = re.split(rb" {3,}|\n", text[at : at + 240])[0]
            self.result.panic = line.decode("latin-1").strip()
        self.result.console = self._last_line(text)

    def _last_line(self, text: bytes) -> str | None:
        crtc = self.ports.crtc
        cursor = crtc[0x0E] << 8 | crtc[0x0F]
        origin = crtc[0x0C] << 8 | crtc[0x0D]
        rows = []
        if 0 < cursor < _VGA_SIZE // 2 and origin <= cursor:
            line = origin + (cursor - origin) // 80 * 80
            rows = [text[start : start + 80] for start in (line, line - 80) if start >= 0]
        if self.ports.uart:
            tail = bytes(self.ports.uart).rstrip().rsplit(b"\n", 1)[-1]
            rows.insert(0, tail)
        if not rows:  # no cursor seen: the last written row of the buffer
            rows = [text[i : i + 80] for i in range(_VGA_SIZE // 2 - 80, -1, -80)]
        for row in rows:
            if row.strip():
                return row.decode("latin-1").strip()
        return None


def _name_instruction(code: bytes) -> str | None:
    """The instruction these bytes start with, among those that stop
    kernels under an emulator (legacy and REX prefixes skipped)."""
    at, lock, wide = 0, False, False
    while at < len(code) and code[at] in (
        0xF0,
        0xF2,
        0xF3,
        0x66,
        0x2E,
        0x36,
        0x3E,
        0x26,
        0x64,
        0x65,
    ):
        lock = lock or code[at] == 0xF0
        at += 1
    if at < len(code) and 0x40 <= code[at] <= 0x4F:
        wide = bool(code[at] & 8)
        at += 1
    op = code[at : at + 3]
    reg = (op[2] >> 3) & 7 if len(op) == 3 else -1
    prefix = "lock " if lock else ""
    if op[:2] == b"\x0f\xc7" and reg == 1:
        return prefix + ("cmpxchg16b" if wide else "cmpxchg8b")
    if op[:2] == b"\x0f\xae" and op[2] < 0xC0 and reg in (4, 5, 6):
        return {4: "xsave", 5: "xrstor", 6: "xsaveopt"}[reg] + ("64" if wide else "")
    named = {b"\x0f\x01\xd1": "xsetbv", b"\x0f\x01\xd0": "xgetbv", b"\x0f\x22\xe0": "mov cr4"}
    if op in named:
        return named[op]
    two = {b"\x0f\x30": "wrmsr", b"\x0f\x32": "rdmsr", b"\x0f\xa2": "cpuid", b"\x0f\x0b": "ud2"}
    return two.get(op[:2]) or ("hlt" if op[:1] == b"\xf4" else None)


def deep_boot(
    fd: int, kernel: Kernel, *, timeout: float = DEEP_TIMEOUT, backend: str | None = None
) -> BootResult:
    """Boot ``kernel`` in a throwaway VM on an open /dev/kvm descriptor, the
    way Firecracker and libkrun direct-boot Linux, until it resets after its
    root-mount panic or ``timeout`` seconds pass.  Never raises for a KVM
    failure: the result says how far it got.  Every descriptor and mapping
    is released on every path (a timeout and KeyboardInterrupt included)."""
    import time

    _check_deep_timeout(timeout)
    runner = _backend_for(backend)
    result = BootResult(runner.name, timeout)
    result.kernel, result.kernel_path = kernel.describe(), kernel.path
    result.mem_size = _boot_memory(kernel)
    guest = _boot_guest(kernel, result.mem_size)
    books = SmokeResult(runner.name, timeout, "kernel")
    start = time.monotonic_ns()
    try:
        session = _Session(fd, guest, runner, books, max(1, int(timeout * 1e9)))
    except _StepFailed as failed:
        result.outcome, result.step, result.error = BOOT_CALL_FAILED, failed.step, failed.error
        return result
    _in_session(session, lambda session: _boot_session(session, kernel, result, start))
    result.elapsed = (time.monotonic_ns() - start) / 1e9
    return result


def _boot_session(session: _Session, kernel: Kernel, result: BootResult, start: int) -> None:
    import ctypes
    import time

    plan = _Plan()
    api = KVM_GET_API_VERSION
    plan.ioctl(STEP_API_VERSION, _KVM, api, value=_V_API, check=_CHECK_EQ, expect=KVM_API_VERSION)
    plan.ioctl(STEP_CREATE_VM, _KVM, KVM_CREATE_VM, 0, fd_out=_VM)
    plan.ioctl(STEP_SET_TSS_ADDR, _VM, KVM_SET_TSS_ADDR, _TSS_ADDR)
    plan.ioctl(STEP_CREATE_IRQCHIP, _VM, KVM_CREATE_IRQCHIP, 0)
    # KVM_PIT_SPEAKER_DUMMY: KVM answers port 0x61 too, the PIT's gate and
    # OUT2, which the kernel's TSC calibration polls (as Firecracker asks).
    pit = (ctypes.c_uint8 * _SIZEOF_KVM_PIT_CONFIG)(1)
    plan.ioctl(STEP_CREATE_PIT2, _VM, KVM_CREATE_PIT2, ctypes.addressof(pit))
    plan.ioctl(STEP_MEMORY_REGION, _VM, KVM_SET_USER_MEMORY_REGION, session.addr(session.region))
    plan.ioctl(STEP_CREATE_VCPU, _VM, KVM_CREATE_VCPU, 0, fd_out=_VCPU)
    plan.ioctl(STEP_GET_CPUID, _KVM, KVM_GET_SUPPORTED_CPUID, session.addr(session.cpuid))
    if not _boot_step(session, plan, result):
        return
    kernel.copy_into(session.mem, session.mem_addr)
    result.kernel = kernel.describe()
    result.milestones["loaded"] = (time.monotonic_ns() - start) / 1e9
    _read_cpuid(session)
    _boot_cpuid(session)
    fpu, lapic = (ctypes.c_uint8 * 416)(), (ctypes.c_uint8 * 1024)()
    fpu[128:130] = list((0x37F).to_bytes(2, "little"))  # fcw
    fpu[408:412] = list((0x1F80).to_bytes(4, "little"))  # mxcsr
    plan = _vcpu_plan(session)
    plan.ioctl(STEP_SET_FPU, _VCPU, KVM_SET_FPU, ctypes.addressof(fpu))
    plan.ioctl(STEP_GET_LAPIC, _VCPU, KVM_GET_LAPIC, ctypes.addressof(lapic))
    if not _boot_step(session, plan, result):
        return
    for offset, mode in ((0x350, 7), (0x360, 4)):  # LINT0 ExtINT, LINT1 NMI
        lvt = int.from_bytes(bytes(lapic[offset : offset + 4]), "little") & ~0x700 | mode << 8
        lapic[offset : offset + 4] = list(lvt.to_bytes(4, "little"))
    regs = _abi().KvmRegs(**session.guest.regs)
    plan = _Plan()
    plan.ioctl(STEP_SET_LAPIC, _VCPU, KVM_SET_LAPIC, ctypes.addressof(lapic))
    plan.ioctl(STEP_SET_REGS, _VCPU, KVM_SET_REGS, ctypes.addressof(regs))
    if not _boot_step(session, plan, result):
        return
    _boot_loop(session, result, start)


def _boot_step(session: _Session, plan: _Plan, result: BootResult) -> bool:
    """Run one set-up plan of the boot; a failure ends it as a failed call."""
    if session.execute(plan):
        return True
    failed = session.result
    result.outcome, result.step, result.error = BOOT_CALL_FAILED, failed.step, failed.error
    return False


def _boot_cpuid(session: _Session) -> None:
    """The supported CPUID as direct-boot VMMs hand it on (Firecracker's and
    libkrun's normalisation): the hypervisor bit, by which the kernel finds
    KVM's leaves (kvmclock gives it the TSC frequency, with no calibration
    against the PIT), and one CPU whose initial APIC ID is 0."""
    for entry in session.cpuid.entries[: session.cpuid.nent]:
        if entry.function == 1:
            entry.ecx |= 1 << 31
            entry.ebx = (entry.ebx & 0xFFFF) | 1 << 16  # APIC ID 0, one logical CPU
        elif entry.function in (0xB, 0x1F):
            entry.edx = 0  # the x2APIC ID


def _boot_loop(session: _Session, result: BootResult, start: int) -> None:
    """Run the vCPU, answering its port IO and MMIO, until it stops for good."""
    import ctypes
    import time

    ports = _BootPorts()
    console = _BootConsole(session.mem_addr, ports, start, result)
    deadline = start + int(result.timeout * 1e9)
    ring, result.coalescing = _coalesce_console(session)
    plan = _Plan()
    plan.run(1, session.signo, _V_T_GUEST)
    ops, count = plan.build()
    out, state, run = session.out, session.state, session.state.run_addr
    exits = result.exits
    now, reset = time.monotonic_ns(), False
    while True:
        remaining = deadline - time.monotonic_ns()
        if remaining <= 0:
            result.outcome = BOOT_TIMED_OUT
            _boot_where(session, result)
            break
        ops[0].request, ops[0].src = min(remaining, _BOOT_SLICE_NS), _cookie()
        session.backend.execute(ops, count, state, out)
        now = time.monotonic_ns()
        if ring:
            _drain_ring(ring, ports, result)
        if out.step >= 0:
            if out.timed_out and now < deadline:  # a slice ran out; the kernel runs on
                console.scan(now)
                continue
            if out.timed_out:
                result.outcome = BOOT_TIMED_OUT
                _boot_where(session, result)
            else:
                result.outcome, result.step, result.error = BOOT_CALL_FAILED, out.step, out.error
            break
        head = bytes(out.run_head)
        reason = _u(head, _RUN_EXIT_REASON, 4)
        name = EXIT_REASONS.get(reason, str(reason))
        exits[name] = exits.get(name, 0) + 1
        if reason == KVM_EXIT_IO:
            size, port, repeat = (
                head[_RUN_IO_SIZE],
                _u(head, _RUN_IO_PORT, 2),
                _u(head, _RUN_IO_COUNT, 4),
            )
            data = run + _u(head, _RUN_IO_OFFSET, 8)
            result.ports[port] = result.ports.get(port, 0) + 1
            if head[_RUN_IO_DIRECTION] == 0:  # in
                answer = b"".join(ports.read(port, size) for _ in range(repeat))
                ctypes.memmove(data, answer, len(answer))
            else:
                for i in range(repeat):
                    ports.write(port, ctypes.string_at(data + i * size, size))
        elif reason == KVM_EXIT_MMIO:
            if not head[_RUN_MMIO_WRITE]:  # nothing is there: reads see all ones
                ctypes.memmove(run + _RUN_MMIO_DATA, b"\xff" * 8, 8)
        elif reason != KVM_EXIT_INTR:
            _boot_stopped(session, result, reason, head)
            reset = reason in (KVM_EXIT_SHUTDOWN, KVM_EXIT_SYSTEM_EVENT)
            break
        console.scan(now)
    # The vCPU has not run since ``now``: what the console shows was printed
    # by then, and is seen then, before a reset is noted.  (With the
    # console's writes in the ring, a scan may not have run for a slice.)
    console.scan(now, force=True)
    if reset:
        result.milestones["reset"] = (now - start) / 1e9
    console.finish()
    if result.outcome in (BOOT_NOT_RUN, BOOT_RESET, BOOT_TIMED_OUT, BOOT_STOPPED):
        if "root-mount" in result.milestones:
            result.outcome = BOOTED  # its own text says it ran its whole init
        elif "panic" in result.milestones:
            result.outcome = BOOT_PANICKED


def _boot_stopped(session: _Session, result: BootResult, reason: int, head: bytes) -> None:
    """Note how the kernel stopped: the exit, and where (see _boot_where)."""
    result.exit_reason = reason
    result.outcome = (
        BOOT_RESET if reason in (KVM_EXIT_SHUTDOWN, KVM_EXIT_SYSTEM_EVENT) else BOOT_STOPPED
    )
    decoded = SmokeResult(result.backend)
    _decode_run(decoded, head)
    result.internal_suberror = decoded.internal_suberror
    result.hardware_entry_failure_reason = decoded.hardware_entry_failure_reason
    result.insn_bytes = decoded.insn_bytes
    _boot_where(session, result)


def _boot_where(session: _Session, result: BootResult) -> None:
    """Where the vCPU is: RIP (through KVM_TRANSLATE, the bytes there and
    the instruction) and whether it waits halted for an interrupt."""
    import ctypes

    regs, where, mp_state = _abi().KvmRegs(), (ctypes.c_uint64 * 3)(), ctypes.c_uint32(0xFFFF)
    plan = _Plan()
    plan.ioctl(STEP_GET_REGS, _VCPU, KVM_GET_REGS, ctypes.addressof(regs))
    plan.ioctl(
        STEP_GET_REGS,
        _VCPU,
        KVM_GET_MP_STATE,
        ctypes.addressof(mp_state),
        soft=True,
        value=_V_T_BASE2,
    )
    if not session.execute(plan):
        return
    result.rip = int(regs.rip)
    result.halted = mp_state.value == _KVM_MP_STATE_HALTED
    where[0] = result.rip  # struct kvm_translation: linear address, physical, valid...
    plan = _Plan()
    plan.ioctl(
        STEP_TRANSLATE, _VCPU, KVM_TRANSLATE, ctypes.addressof(where), soft=True, value=_V_T_BASE
    )
    session.execute(plan)
    physical, valid = int(where[1]), int(where[2]) & 0xFF
    if not result.insn_bytes and valid and physical + 15 <= result.mem_size:
        result.insn_bytes = bytes(session.mem[physical : physical + 15])
    if result.insn_bytes:
        result.instruction = _name_instruction(result.insn_bytes)


def _settle() -> None:
    """Release the earlier stages' throwaway VMs before the boot: their
    teardown would take the CPU from the kernel's early timer calibration
    (on a one-CPU host that made the kernel's TSC calibration fail)."""
    _wait_for_closes()
    held = _CACHE.get("held-for-exit")
    while held:
        release, _ = held.pop()
        release()


def _check_deep_timeout(timeout: object) -> None:
    _check_timeout(timeout, "deep_timeout", MAX_DEEP_TIMEOUT)


def _deep_stage(fd: int, facts: Facts, backend: str | None) -> None:
    """The deep boot as a stage of the facts: the kernel asked for (or the
    newest BoxLite extracted), booted; or why it was not."""
    result = BootResult(_backend_for(backend).name, facts.deep_timeout)
    facts.deep = result
    if facts.arch != "x86_64":
        result.note = "the deep boot is x86_64 only: an arm64 boot needs a device tree"
        return
    path = facts.kernel
    if path is None:
        found, where = boxlite_kernels()
        if not found:
            result.note = (
                f"no kernel to boot: BoxLite has extracted none under {where} (it does on its "
                "first runtime construction); pass one with --kernel PATH (libkrunfw's "
                "libkrunfw.so, a vmlinux or a bzImage)"
            )
            return
        path = found[0]
    kernel = open_kernel(path)
    _settle()
    try:
        facts.deep = deep_boot(fd, kernel, timeout=facts.deep_timeout, backend=backend)
    finally:
        kernel.close()


class _Deep:
    """The deep boot asked for: the kernel (None: BoxLite's newest) and the bound."""

    __slots__ = ("kernel", "timeout")

    def __init__(self, kernel: str | None = None, timeout: float = DEEP_TIMEOUT) -> None:
        self.kernel, self.timeout = kernel, timeout


def _deep_asked(deep: bool, kernel: str | None, timeout: float) -> _Deep | None:
    """The public arguments (deep, kernel, deep_timeout) as one value."""
    if not deep:
        if kernel is not None:
            raise InvalidArgumentError("kernel= is for the deep boot: pass deep=True with it")
        return None
    _check_deep_timeout(timeout)
    return _Deep(kernel, timeout)


# ── Findings: what the report shows, rendered from the facts ────────────────

PASS, WARN, FAIL, SKIP, INFO = "pass", "warn", "fail", "skip", "info"


class Finding:
    """One observation of the report: id, status, summary, evidence and fix."""

    __slots__ = ("duration_s", "error", "evidence", "fix", "id", "status", "summary")

    def __init__(
        self,
        id: str,
        status: str,
        summary: str,
        evidence: Mapping[str, object] | None = None,
        fix: str = "",
        duration: float = 0.0,
    ) -> None:
        self.id = id
        self.status = status
        self.summary = summary
        self.evidence: dict[str, object] = dict(evidence or {})
        self.fix = fix
        #: How long gathering this finding took, in seconds.
        self.duration_s = duration
        #: The error SystemCheck.run() raises for this failure, if any.
        self.error: BoxliteError | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "status": self.status,
            "summary": self.summary,
            "evidence": self.evidence,
            "fix": self.fix,
            "duration_s": round(self.duration_s, 6),
        }

    def __repr__(self) -> str:
        return f"<Finding {self.id} {self.status}: {self.summary}>"


def _failing(id: str, error: BoxliteError, duration: float = 0.0) -> Finding:
    """The finding that carries the gate's error: its summary, evidence and fix."""
    evidence = {"cause": error.cause, **error.evidence}
    finding = Finding(id, FAIL, error.summary, evidence, error.fix, duration)
    finding.error = error
    return finding


def _carry(finding: Finding, error: BoxliteError | None) -> Finding:
    """Give a finding the gate's error when it is this finding's layer."""
    if error is not None and _layer(error) == finding.id:
        carried = _failing(finding.id, error, finding.duration_s)
        carried.evidence = {**carried.evidence, **finding.evidence, "cause": error.cause}
        return carried
    return finding


def _device_finding(facts: Facts, error: BoxliteError | None) -> Finding:
    ev = facts.ev
    node = _node_text(ev.node)
    evidence = {"path": facts.path, "node": node}
    if ev.node is None:
        finding = Finding("kvm.device", FAIL, f"{facts.path} is missing", evidence)
    elif ev.is_kvm_node():
        finding = Finding("kvm.device", PASS, f"{facts.path}: {node}", evidence)
    else:
        summary = f"{facts.path} is not character device 10:232: {node}"
        finding = Finding("kvm.device", WARN, summary, evidence)
    return _carry(finding, error)


def _smoke_finding(facts: Facts, error: BoxliteError | None, duration: float) -> Finding:
    smoke, layer = facts.smoke, _layer(error)
    if layer == "kvm.smoke":
        assert error is not None
        return _failing("kvm.smoke", error, duration)
    if facts.open_errno == errno.ENOENT:
        return Finding("kvm.smoke", SKIP, "not run: there is no device to open")
    if smoke is None and facts.open_errno is None and layer not in ("kvm.device",):
        summary = (
            f"{facts.path} opens, but guest code was not run: no smoke test for {facts.machine} yet"
        )
        return Finding(
            "kvm.smoke", WARN, summary, {"machine": facts.machine, "smoke_tested": False}
        )
    if smoke is None or not smoke.ran:
        where = f"{smoke.step_name}: {errno_name(smoke.error)}" if smoke and smoke.error else "it"
        return Finding(
            "kvm.smoke", FAIL, f"no guest code ran (stopped at {where})", duration=duration
        )
    what = {
        "real-mode": "a trivial guest ran and halted",
        "long-mode": "a 64-bit guest ran",
        "aarch64": "arm64 guest code ran and wrote its proof by MMIO",
    }[smoke.guest]
    summary = f"the device works: {what} ({smoke.backend} backend)"
    evidence = smoke.as_dict() if smoke.guest != "long-mode" else {}
    evidence.update(backend=smoke.backend, bound=smoke.bound, runs=smoke.runs)
    if smoke.bound == "none":
        summary += "; the run was unbounded: no timer and no watchdog thread could be had"
        fix = "raise RLIMIT_SIGPENDING and the thread limit of this process"
        return Finding("kvm.smoke", WARN, summary, evidence, fix, duration)
    return Finding("kvm.smoke", PASS, summary, evidence, duration=duration)


def _guest_findings(result: SmokeResult, error: BoxliteError | None) -> list[Finding]:
    """The real-guest layers: hardware speed, a stock kernel's instructions, MSRs.

    The gate's error rides on the finding of its layer; another layer that
    fails as a consequence of it fails without a fix of its own.
    """
    speed = result.speed
    duration = result.elapsed
    if speed is None:
        speed_finding = Finding("guest.speed", SKIP, "not measured: the guest stopped first")
    elif speed.emulated is None:
        speed_finding = Finding("guest.speed", SKIP, speed.describe(), speed.as_dict())
    else:
        status, what = (
            (FAIL, "emulated in software") if speed.emulated else (PASS, "at hardware speed")
        )
        speed_finding = Finding(
            "guest.speed", status, f"guest code runs {what}: " + speed.describe(), speed.as_dict()
        )
    evidence = result.as_dict()
    if result.ok:
        ran = ["64-bit long mode", *result.stages_run()[1:-1]]
        summary = f"a stock kernel's early code runs: {', '.join(ran)}"
        kernel = Finding("guest.stock_kernel", PASS, summary, evidence, duration=duration)
    elif result.timed_out:
        summary = f"the long-mode guest did not halt within {result.timeout:g} s"
        kernel = Finding("guest.stock_kernel", FAIL, summary, evidence, duration=duration)
    else:
        kernel = Finding(
            "guest.stock_kernel", FAIL, _stopped_at(result), evidence, duration=duration
        )
    msrs = result.msrs
    arch = msrs.get("arch_capabilities")
    if msrs.get("boot_msr_refused"):
        summary = f"KVM refuses the boot MSR {msrs['boot_msr_refused']}"
        msr = Finding("guest.msrs", FAIL, summary, msrs)
    elif isinstance(arch, dict) and not arch.get("accepted"):
        summary = "ARCH_CAPABILITIES is offered in the supported CPUID but KVM refuses to set it"
        fix = (
            "QEMU with -cpu host aborts here ('failed to set MSR 0x10a'): give QEMU "
            "-cpu host,-arch-capabilities, or update the host kernel"
        )
        msr = Finding("guest.msrs", WARN, summary, msrs, fix)
    elif msrs:
        offered = "offered and accepted" if isinstance(arch, dict) else "not offered"
        summary = f"the {len(BOOT_MSRS)} boot MSRs are accepted; ARCH_CAPABILITIES {offered}"
        msr = Finding("guest.msrs", PASS, summary, msrs)
    else:
        msr = Finding("guest.msrs", SKIP, "not set: the guest stopped first")
    return [_carry(f, error) for f in (speed_finding, kernel, msr)]


def _engine_findings(facts: Facts, error: BoxliteError | None) -> list[Finding]:
    """Every engine's verdict; only the selected engine's decides the report."""
    found = []
    for name in ENGINES:
        mine = name == facts.engine
        # The selected engine's diagnosis is the gate's; each other engine's
        # is what the gate would say for it.
        other = facts.for_engine(name)
        verdict = _verdict(other, error if mine else _diagnose_staged(other))
        text = f"{name} {verdict['verdict']}" + (f": {verdict['why']}" if verdict["why"] else "")
        if not mine:
            found.append(Finding(f"engine.{name}", INFO, text, verdict))
            continue
        status = PASS if verdict["verdict"] == WOULD_RUN else FAIL
        finding = Finding(f"engine.{name}", status, text, verdict)
        if error is not None and _layer(error) == "engine":
            finding.error, finding.fix = error, error.fix
            finding.evidence = {"cause": error.cause, **verdict}
        found.append(finding)
    return found


def _capabilities_finding(facts: Facts) -> Finding:
    caps = facts.caps
    if caps is None:
        why = (
            "the device does not open" if facts.open_errno is not None else "the device is not KVM"
        )
        return Finding("kvm.capabilities", SKIP, f"not read: {why}")
    present = sum(1 for value in caps.values() if value > 0)
    summary = (
        f"{present} of {len(caps)} capabilities the engines ask about are offered; up to "
        f"{caps.get('MAX_VCPUS')} vCPUs, {caps.get('NR_MEMSLOTS')} memory slots"
    )
    evidence = {
        name: {"number": KVM_CAPS[name], "value": v if v >= 0 else errno.errorcode.get(-v)}
        for name, v in caps.items()
    }
    return Finding("kvm.capabilities", INFO, summary, evidence)


def _groups_finding(facts: Facts) -> Finding:
    ev, node = facts.ev, facts.ev.node
    if node is None:
        return Finding("kvm.groups", SKIP, f"{facts.path} is missing: no group to check")
    group = node.get("group") or f"gid {node['gid']}"
    held = _group_matches(ev)
    evidence = {
        "user": ev.user,
        "uid": ev.euid,
        "device_group": group,
        "listed_in_group_db": ev.group_listed,
        "process_has_group": held,
        "process_groups": list(ev.groups),
    }
    user = ev.user or f"uid {ev.euid}"
    if ev.unmapped("gid"):
        summary = (
            f"the device's group is not mapped into this user namespace (it shows as {group}); "
            "whether this process holds it cannot be seen from here"
        )
        return Finding("kvm.groups", INFO, summary, evidence)
    if ev.euid == 0 and not ev.in_userns:
        return Finding(
            "kvm.groups", INFO, "running as root: the device mode does not apply", evidence
        )
    if _perm_allows(node["mode"]):
        summary = (
            f"{facts.path} is open to every user (mode {node['mode']:04o}): no group is needed"
        )
        return Finding("kvm.groups", INFO, summary, evidence)
    if _owner_matches(ev):
        return Finding("kvm.groups", INFO, f"{user} owns {facts.path}", evidence)
    if held:
        return Finding("kvm.groups", PASS, f"this process has group {group}", evidence)
    if ev.group_listed:
        summary = f"{user} is in group {group} but this session predates it"
        return Finding(
            "kvm.groups", WARN, summary, evidence, f"log out and back in (or `newgrp {group}`)"
        )
    return Finding("kvm.groups", INFO, f"{user} is not in group {group}", evidence)


def _module_finding(facts: Facts) -> Finding:
    ev = facts.ev
    modules = ev.kvm_modules
    evidence: dict[str, object] = {"loaded": modules}
    for name in ("kvm_intel", "kvm_amd"):
        nested = _read_text(f"/sys/module/{name}/parameters/nested")
        if nested is not None:
            evidence[f"{name}.nested"] = nested.strip()
    if not modules:
        if not _exists("/sys/module"):
            return Finding("kvm.module", SKIP, "/sys/module is not available", evidence)
        return Finding("kvm.module", INFO, "no KVM module is loaded", evidence)
    if ev.kvm_provider == "kvm_pvm":
        if ev.pvm_native is not None:
            evidence["kvm_pvm.pvm_native"] = ev.pvm_native
        summary = (
            "KVM module in use: kvm_pvm (paravirtual KVM without VT-x/AMD-V: PVM-enabled guest "
            "kernels run at speed, other guests' kernel code is emulated)"
        )
        return Finding("kvm.module", INFO, summary, evidence)
    return Finding("kvm.module", INFO, f"KVM module in use: {ev.kvm_provider or 'kvm'}", evidence)


def _cpu_finding(facts: Facts) -> Finding:
    flags, guest = facts.ev.cpu_flags, facts.smoke
    if flags is None:
        return Finding("cpu.flags", SKIP, "/proc/cpuinfo lists no x86 flags")
    virt = sorted({"vmx", "svm"} & flags)
    evidence = {"vmx": "vmx" in flags, "svm": "svm" in flags, "hypervisor": "hypervisor" in flags}
    if virt:
        return Finding("cpu.flags", INFO, f"CPU flags: {', '.join(virt)}", evidence)
    where = "running under a hypervisor" if "hypervisor" in flags else "bare metal"
    summary = f"no vmx/svm flag ({where})"
    if guest is not None and guest.emulated is False and guest.ok:
        summary += ", yet guest code runs at hardware speed: flag-based checkers would wrongly refuse this host"
    elif guest is not None and guest.emulated:
        summary += (
            ": /dev/kvm works, but stock guests' kernel code is emulated; flag-based checkers "
            "refuse this host for that missing flag, which is the right verdict for the wrong reason"
        )
    return Finding("cpu.flags", INFO, summary, evidence)


def _context_finding(facts: Facts) -> Finding:
    """Where this process runs: container, cluster, user namespace, sandbox, LSM."""
    ev = facts.ev
    parts = []
    if ev.runtime:
        parts.append(f"{ev.runtime} ({', '.join(ev.runtime_evidence)})")
    if ev.private_dev:
        parts.append("a private /dev (tmpfs)")
    if ev.in_userns:
        parts.append(f"a user namespace (uid_map {(ev.userns or {}).get('uid_map') or 'empty'})")
    if ev.systemd_unit:
        parts.append(f"systemd unit {ev.systemd_unit}")
    if _device_cgroup(ev):
        parts.append(f"device cgroup {_cgroup_path(ev)}")
    if ev.wsl:
        parts.append(f"WSL {ev.wsl}")
    if ev.seccomp == "2":
        parts.append("a seccomp filter")
    evidence = {
        "runtime": ev.runtime,
        "runtime_evidence": ev.runtime_evidence,
        "private_dev": ev.private_dev,
        "user_namespace": ev.userns,
        "cgroup": ev.cgroup,
        "systemd_unit": ev.systemd_unit,
        "wsl": ev.wsl,
        "no_new_privs": ev.no_new_privs,
        "seccomp": ev.seccomp,
        "landlock_abi": ev.landlock_abi,
        "lsm": ev.lsm,
        "lsm_context": ev.lsm_context,
    }
    if parts:
        return Finding("host.context", INFO, "running in " + "; ".join(parts), evidence)
    summary = "no container, user namespace, sandbox or WSL detected"
    return Finding("host.context", INFO, summary, evidence)


def _deep_finding(facts: Facts, error: BoxliteError | None) -> Finding:
    """The deep boot: how far the engine's kernel got, in its own words."""
    result = facts.deep
    assert result is not None
    evidence = result.as_dict()
    if result.outcome == BOOT_NOT_RUN:
        return Finding("deep.boot", SKIP, f"not run: {result.note}", evidence)
    if result.ok:
        reached = result.milestones.get(
            "reset", result.milestones.get("root-mount", result.elapsed)
        )
        summary = (
            f"{result.kernel} booted to its root-mount panic in {reached:.2f} s under this KVM "
            f"({result.milestones_text()}; {result.exit_count} KVM exits, "
            f"{result.mem_size // _MIB} MiB of guest memory)"
        )
        return Finding("deep.boot", PASS, summary, evidence, duration=result.elapsed)
    key = next(key for key, holds in RULES if key.startswith("deep-") and holds(facts))
    own = _render(key, facts)
    finding = Finding("deep.boot", FAIL, own.summary, {"cause": own.cause, **evidence})
    finding.duration_s = result.elapsed
    return _carry(finding, error)


# ── Probes: gather the facts for a platform ─────────────────────────────────


class _closing_on_error:  # noqa: N801 - used as a statement, like contextlib.closing
    """Close a device when the block raises (a caller's exception included)."""

    def __init__(self, device: io.FileIO) -> None:
        self.device = device

    def __enter__(self) -> io.FileIO:
        return self.device

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is not None:
            self.device.close()


class HypervisorProbe:
    """Platform-specific hypervisor checks.

    ``acquire()`` is the gate: it raises the BoxliteError for the first
    cause it meets.  ``gather()`` collects the facts the report shows;
    ``findings()`` renders them.  Both diagnose through _diagnose, so the
    gate and the report name the same cause.
    """

    name = "none"
    platform = "unknown"
    machine = ""

    def facts(self, engine: str | None, timeout: float) -> Facts:
        return Facts(self.platform, self.machine, engine=engine, timeout=timeout)

    def _asked(self, engine: str | None, timeout: float, deep: _Deep | None) -> Facts:
        """The facts to gather, with the deep boot asked for (or not)."""
        _check_engine(engine)
        _check_timeout(timeout)
        facts = self.facts(engine, timeout)
        if deep is not None:
            _check_deep_timeout(deep.timeout)
            facts.deep_wanted, facts.kernel, facts.deep_timeout = True, deep.kernel, deep.timeout
        return facts

    def acquire(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        backend: str | None = None,
        engine: str | None = DEFAULT_ENGINE,
        deep: _Deep | None = None,
    ) -> tuple[io.FileIO | None, SmokeResult | None]:
        """Validate the host; return (the open device or None, smoke result or None)."""
        facts = self._asked(engine, timeout, deep)
        error = _diagnose(facts)
        if error is not None:
            try:
                raise error
            finally:
                del error  # see KvmProbe.acquire
        return None, None

    def startup_check(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        backend: str | None = None,
        engine: str | None = DEFAULT_ENGINE,
    ) -> None:
        """One-time validation; raises BoxliteError when the host is unusable."""
        device, _ = self.acquire(timeout, backend, engine)
        if device is not None:
            device.close()

    def gather(
        self,
        engine: str | None,
        timeout: float,
        backend: str | None,
        probe_hvf: bool = False,
        deep: _Deep | None = None,
    ) -> Facts:
        """Everything the report shows, as facts."""
        return self._asked(engine, timeout, deep)

    def findings(self, facts: Facts, error: BoxliteError | None) -> list[Finding]:
        """The report's findings for these facts and their diagnosis."""
        if error is not None:
            return [_failing(_layer(error) or "platform", error)]
        return []

    def diagnose_create_failure(
        self,
        error: BaseException,
        engine: str | None = DEFAULT_ENGINE,
        timeout: float = DEFAULT_TIMEOUT,
        log: str = "",
    ) -> BaseException:
        """The precise cause of an engine's failure to create or start a VM.

        The error is read first: one that is not the host's (an image, the
        storage, the configuration, the network, the guest agent) comes back
        unchanged.  For a host fault the host is checked again for that
        engine, with the engine's message (and ``log``, its log lines)
        decoded: a cause found comes back with the engine's error as
        ``__cause__``; otherwise the original comes back.
        """
        if not _host_fault(error):
            return error
        _check_engine(engine)
        facts = self.facts(engine, timeout)
        facts.message = "\n".join(part for part in (str(error), log) if part)
        facts.decoded = decode_engine_message(facts.message)
        precise = self._refine(facts, error)
        if precise is None:
            return error
        precise.__cause__ = error
        return precise

    def _refine(self, facts: Facts, error: BaseException) -> BoxliteError | None:
        return _diagnose(facts)


class UnsupportedPlatformProbe(HypervisorProbe):
    """Any system other than Linux and macOS: BoxLite does not run there."""

    name = "unsupported"

    def __init__(self, system: str) -> None:
        self.platform = system

    def __repr__(self) -> str:
        return f"UnsupportedPlatformProbe({self.platform!r})"


class KvmProbe(HypervisorProbe):
    """Linux: open /dev/kvm and run guest code in a throwaway VM."""

    name = "kvm"
    platform = "linux"

    def __init__(self, machine: str, path: str = KVM_DEVICE) -> None:
        self.machine = machine
        self.path = path

    def __repr__(self) -> str:
        return f"KvmProbe({self.machine!r}, path={self.path!r})"

    @property
    def arch(self) -> str:
        """The architecture as the engine table names it."""
        return _ARCH_NAMES.get(self.machine, self.machine)

    @property
    def can_smoke_test(self) -> bool:
        # The guests and structures are those of a 64-bit process; a 32-bit
        # interpreter on a 64-bit kernel would pass KVM the wrong layouts.
        return self.machine in _SMOKE_MACHINES and sys.maxsize > 2**32

    def facts(self, engine: str | None, timeout: float) -> Facts:
        facts = Facts("linux", self.machine, engine=engine, path=self.path, timeout=timeout)
        return facts

    def _guest_kind(self, engine: str | None) -> str:
        """The guest that proves what ``engine`` needs on this architecture."""
        if self.arch == "aarch64":
            return "aarch64"
        return "real-mode" if engine is None else "long-mode"

    def _open(self, facts: Facts) -> io.FileIO | None:
        """Open the device as a VMM does; the errno goes into the facts."""
        try:
            return _open_device(self.path)
        except OSError as err:
            facts.open_errno = _errno_of(err)
            facts.open_error = err
            return None

    def _run(
        self, facts: Facts, fd: int, backend: str | None, startup: _Startup | None = None
    ) -> None:
        """The smoke test, with ``startup`` made in its guest's first
        array (see _run_program)."""
        if not self.can_smoke_test:
            return
        kind = self._guest_kind(facts.engine)
        _check_timeout(facts.timeout)
        facts.smoke = _run_program(fd, _guest(kind), facts.timeout, backend, startup)

    def gate(
        self, engine: str | None, timeout: float, backend: str | None, facts: Facts | None = None
    ) -> tuple[Facts, io.FileIO | None, BoxliteError | None]:
        """The gate, stage by stage: (facts, the open device or None, the cause).

        It asks for a cause after each stage and stops at the first one; on
        success the caller owns the device.  The deep boot, when the facts
        ask for it, comes last, once every fast stage has passed.
        """
        facts = facts or self._asked(engine, timeout, None)
        device = self._open(facts)
        if device is None:
            return facts, None, self._cause(facts)
        with _closing_on_error(device):
            fd = device.fileno()
            error, asked = None, None
            caps = None if engine is None else _kvm_answers(fd, facts.engine_caps, backend)
            if caps is not None:
                facts.speaks_kvm, facts.caps = True, caps
                error, asked = _diagnose_staged(facts), "caps"
            if error is None:
                # The start-up VMs are made in the guest's first array, just
                # before the guest's VM: one foreign call, and on Linux 6.1
                # making a VM waits for an RCU grace period unless another VM
                # was made within one, and the guest's runs between the two
                # would outlast it (10 ms of a 45 ms gate in the nested
                # host).  The releasing thread is held until the
                # answer is made, so no teardown runs beside the guest's runs
                # and the speed probe, and the thread, woken, does not take
                # the interpreter's lock from the rules.  The order of the
                # causes is kept by asking stage by stage.
                with _HeldReleases():
                    startup = _Startup(facts.engine_ioctls) if facts.engine_ioctls else None
                    self._run(facts, fd, backend, startup)
                    if startup is not None:
                        # Made alone where the guest's first array never ran.
                        facts.ioctls = startup.answers
                        if facts.ioctls is None:
                            facts.ioctls = _probe_startup_ioctls(fd, startup.wanted, backend)
                    facts.complete = True
                    error = _diagnose_staged(facts, after=asked)
            if error is None and facts.deep_wanted:
                _deep_stage(fd, facts, backend)
                if facts.deep is not None and facts.deep.outcome == BOOT_NOT_RUN:
                    if self.arch == "x86_64":  # the proof asked for cannot be made
                        raise InvalidArgumentError(facts.deep.note)
                    _log("info", "deep boot skipped: %s", facts.deep.note)
                    facts.deep = None
                error = _diagnose_staged(facts, after="smoke")
            if error is not None:
                device.close()
                return facts, None, error
        return facts, device, None

    def _cause(self, facts: Facts) -> BoxliteError:
        error = _diagnose(facts)
        assert error is not None  # every open errno has a rule
        error.__cause__ = facts.open_error
        return error

    def acquire(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        backend: str | None = None,
        engine: str | None = DEFAULT_ENGINE,
        deep: _Deep | None = None,
    ) -> tuple[io.FileIO | None, SmokeResult | None]:
        """Open the device and prove what ``engine`` needs; the caller owns
        the open device (a file object: its ``fileno()`` is the descriptor).
        With an engine the guest is the long-mode one a real kernel needs
        (and its speed); with ``engine=None`` the trivial one.  ``deep``
        boots the engine's kernel too, once the fast stages passed.
        """
        facts = self._asked(engine, timeout, deep)
        facts, device, error = self.gate(engine, timeout, backend, facts)
        if error is not None:
            try:
                raise error
            finally:
                # The traceback holds this frame: were the error still in
                # it, each refusal would be a cycle (and its facts garbage
                # until the next collection) instead of freed when dropped.
                del error
        if facts.smoke is None:
            _log(
                "debug",
                "no smoke test for %s: %s opened, guest code not run",
                self.machine,
                self.path,
            )
        return device, facts.smoke

    def gather(
        self,
        engine: str | None,
        timeout: float,
        backend: str | None,
        probe_hvf: bool = False,
        deep: _Deep | None = None,
    ) -> Facts:
        """Every fact the report shows: all capabilities, every engine's
        start-up ioctls, the guest, with the time each stage took; and the
        deep boot when asked for, whatever the fast stages found, so the two
        can be compared."""
        import time

        facts = self._asked(engine, timeout, deep)
        durations = facts.durations
        start = time.perf_counter()
        device = self._open(facts)
        if device is None:
            if facts.deep_wanted:
                facts.deep = BootResult("none", facts.deep_timeout)
                facts.deep.note = f"{self.path} does not open"
            return facts
        with device:
            fd = device.fileno()
            caps = _kvm_answers(fd, _all_caps(self.arch), backend)
            facts.speaks_kvm = caps is not None
            if caps is not None:
                facts.caps = caps
                durations["kvm.capabilities"] = time.perf_counter() - start
            with _HeldReleases():  # the start-up VMs first, as in gate()
                if facts.speaks_kvm and engine is not None and self.arch == "x86_64":
                    facts.ioctls = _probe_startup_ioctls(fd, _STARTUP_STEPS, backend)
                start = time.perf_counter()
                self._run(facts, fd, backend)
                durations["kvm.smoke"] = time.perf_counter() - start
            if facts.deep_wanted:
                if facts.speaks_kvm:
                    _deep_stage(fd, facts, backend)
                else:
                    facts.deep = BootResult("none", facts.deep_timeout)
                    facts.deep.note = f"{self.path} does not speak KVM's API"
        return facts

    def findings(self, facts: Facts, error: BoxliteError | None) -> list[Finding]:
        durations = facts.durations
        found = [_device_finding(facts, error)]
        found.append(_smoke_finding(facts, error, durations.get("kvm.smoke", 0.0)))
        smoke = facts.smoke
        if (
            facts.engine is not None
            and smoke is not None
            and smoke.guest == "long-mode"
            and smoke.ran
        ):
            found += _guest_findings(smoke, error)
        if facts.engine is not None and facts.caps is not None and self.can_smoke_test:
            found += _engine_findings(facts, error)
        if facts.deep is not None:
            found.append(_deep_finding(facts, error))
        found.append(_capabilities_finding(facts))
        found[-1].duration_s = durations.get("kvm.capabilities", 0.0)
        found += [_groups_finding(facts), _module_finding(facts), _cpu_finding(facts)]
        found.append(_context_finding(facts))
        return found

    def _refine(self, facts: Facts, error: BaseException) -> BoxliteError | None:
        """The gate again for the facts' engine; on a host that passes, the
        engine's message decoded (engine-error-decoded), or nothing."""
        facts, device, precise = self.gate(facts.engine, facts.timeout, None, facts)
        if device is not None:
            device.close()
        return precise


class HvfProbe(HypervisorProbe):
    """macOS: Apple Silicon and Hypervisor.framework."""

    name = "hvf"
    platform = "darwin"

    def __init__(self, machine: str) -> None:
        self.machine = machine

    def __repr__(self) -> str:
        return f"HvfProbe({self.machine!r})"

    def facts(self, engine: str | None, timeout: float) -> Facts:
        facts = Facts("darwin", self.machine, engine=engine, timeout=timeout)
        for name in MACOS_SYSCTLS:
            try:
                facts.sysctls[name] = _sysctl_int(name)
            except OSError as err:
                facts.sysctls[name] = errno_name(_errno_of(err))
        return facts

    def gather(
        self,
        engine: str | None,
        timeout: float,
        backend: str | None,
        probe_hvf: bool = False,
        deep: _Deep | None = None,
    ) -> Facts:
        facts = self._asked(engine, timeout, None)  # the deep boot is Linux's
        if probe_hvf:
            facts.probe_hvf = self._probe()
        return facts

    def _probe(self) -> tuple[int, int | None] | str:
        """hv_vm_create(NULL) here, destroyed when it worked: (code, destroy's code)."""
        try:
            code = _hv_vm_create()
        except (OSError, AttributeError) as err:
            return f"Hypervisor.framework not loadable: {err}"
        return code, _hv_vm_destroy() if code == HV_SUCCESS else None

    def findings(self, facts: Facts, error: BoxliteError | None) -> list[Finding]:
        layer = _layer(error)
        arch = Finding(
            "macos.arch", PASS, "Apple Silicon, native arm64 Python", {"machine": self.machine}
        )
        support = Finding("macos.hv_support", PASS, "kern.hv_support = 1")
        if layer == "macos.arch":
            support = Finding("macos.hv_support", SKIP, "not read: the architecture is refused")
        found = [_carry(arch, error), _carry(support, error)]
        for name, key in (
            ("kern.hv_vmm_present", "macos.vmm_present"),
            ("kern.hv.max_address_spaces", "macos.max_address_spaces"),
        ):
            value = facts.sysctl(name)
            if isinstance(value, str):
                found.append(Finding(key, SKIP, f"{name} unreadable: {value}"))
            elif value is None:
                found.append(Finding(key, SKIP, f"{name} does not exist on this macOS"))
            else:
                found.append(Finding(key, INFO, f"{name} = {value}", {name: value}))
        probed = facts.probe_hvf
        if isinstance(probed, str):
            found.append(Finding("macos.hv_vm_create", SKIP, probed))
        elif probed is not None:
            code, destroyed = probed
            name = HV_RETURN_NAMES.get(code, f"{code:#x}")
            evidence: dict[str, object] = {"hv_return": name}
            if code == HV_SUCCESS:
                evidence["hv_vm_destroy"] = HV_RETURN_NAMES.get(destroyed or 0, f"{destroyed:#x}")
                found.append(
                    Finding("macos.hv_vm_create", PASS, "hv_vm_create succeeded", evidence)
                )
            elif code == HV_DENIED:
                summary = (
                    f"this process ({sys.executable}) is not entitled to Hypervisor.framework "
                    "(HV_DENIED); a signed VMM would be"
                )
                found.append(Finding("macos.hv_vm_create", INFO, summary, evidence))
            else:
                found.append(
                    Finding("macos.hv_vm_create", FAIL, f"hv_vm_create returned {name}", evidence)
                )
        return found

    def _refine(self, facts: Facts, error: BaseException) -> BoxliteError | None:
        """An engine runs Hypervisor.framework in its own signed helper, so a
        probe from this process proves something only when this process is
        entitled too: then hv_vm_create() is reproduced here.  Otherwise the
        engine's own hv_return_t is decoded from its message and host facts
        are reported, without claiming the engine's cause."""
        facts.entitled = _hv_entitlement()
        if not facts.entitled:
            facts.hv = _hv_code_in(facts.message or "")
            return _diagnose(facts)
        probed = self._probe()
        if isinstance(probed, str):
            _log("debug", "HVF diagnostic unavailable: %s", probed)
            return None
        code = probed[0]
        name = HV_RETURN_NAMES.get(code, "an unlisted code")
        if code in (HV_SUCCESS, HV_BUSY):
            _log(
                "debug", "HVF diagnostic: hv_vm_create answered %s; the failure is elsewhere", name
            )
        else:
            _log("error", "HVF diagnostic: hv_vm_create returned %s (%#x)", name, code)
        facts.hv = (code, "process")
        return _diagnose(facts)


def _hv_code_in(message: str) -> tuple[int, str] | None:
    """An hv_return_t written in an engine's message (hex, or signed decimal)."""
    import re

    for text in re.findall(r"0x[fF][aA][eE]94[0-9a-fA-F]{3}|-8537\d{4}", message):
        value = int(text, 0) & 0xFFFFFFFF
        if value in HV_RETURN_NAMES:
            return value, "engine"
    return None


# ── Platform dispatch ───────────────────────────────────────────────────────


def _check_engine(engine: str | None) -> None:
    if engine is not None and engine not in ENGINES:
        choices = ", ".join(ENGINES)
        raise InvalidArgumentError(f"engine must be one of {choices} or None, got {engine!r}")


def _select_probe(system: str, machine: str) -> HypervisorProbe:
    """Pick the probe for a sys.platform value and a machine name."""
    if system.startswith("linux"):
        return KvmProbe(machine)
    if system == "darwin":
        return HvfProbe(machine)
    return UnsupportedPlatformProbe(system)


_PROBE = _select_probe(sys.platform, os.uname().machine if hasattr(os, "uname") else "")


def hypervisor_probe() -> HypervisorProbe:
    """The probe chosen for this host at import."""
    return _PROBE


# ── Public API ──────────────────────────────────────────────────────────────

# Exceptions that are the checker's own failure, never a verdict about the
# host: the library raises InternalError for them, the CLI exits 3.  An
# OSError without an errno is a caller's (a signal handler's) and passes.
_CHECKER_FAULTS = (
    MemoryError,
    RecursionError,
    AssertionError,
    AttributeError,
    TypeError,
    ValueError,
    LookupError,
    ArithmeticError,
    ImportError,
    _SysError,
)


def _as_checker_fault(err: BaseException) -> BaseException:
    """InternalError for the checker's own failure; anything else as it came."""
    if isinstance(err, BoxliteError):
        return err
    ours = isinstance(err, _CHECKER_FAULTS) or (isinstance(err, OSError) and err.errno is not None)
    if not ours:
        return err
    facts = Facts()
    facts.note = f"{type(err).__name__}: {err}"
    internal = _render("checker-failed", facts)
    internal.__cause__ = err
    return internal


class SystemCheck:
    """Proof that the host passed its checks.

    On Linux it holds the validated /dev/kvm descriptor (read-write,
    close-on-exec) until ``close()`` or the end of a ``with`` block.
    """

    def __init__(
        self, device: io.FileIO | None, smoke: SmokeResult | None, probe: HypervisorProbe
    ) -> None:
        self._device = device
        self.smoke = smoke
        self.probe = probe

    @classmethod
    def run(
        cls,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        backend: str | None = None,
        engine: str | None = DEFAULT_ENGINE,
        deep: bool = False,
        kernel: str | None = None,
        deep_timeout: float = DEEP_TIMEOUT,
    ) -> SystemCheck:
        """Verify the host; raise a BoxliteError with the cause and fix if it fails.

        ``engine`` ("libkrun", BoxLite's engine, by default) asks whether a
        real guest of that engine can run: its capabilities and start-up
        ioctls, then a 64-bit guest that runs a stock kernel's early
        instructions at hardware speed, with the MSRs a direct-boot VMM sets.
        ``engine=None`` is the bare device check: /dev/kvm opens, speaks API
        12, creates a VM and runs a trivial guest.  The checker's own failure
        raises InternalError, never a verdict.

        ``deep=True`` then boots the engine's own kernel (``kernel``: the
        path of libkrunfw's library, a vmlinux or a bzImage; by default the
        newest libkrunfw BoxLite extracted) in a throwaway VM, to its
        root-mount panic, within ``deep_timeout`` seconds (x86_64; elsewhere
        it is skipped).  No kernel to boot raises InvalidArgumentError.
        """
        asked = _deep_asked(deep, kernel, deep_timeout)
        try:
            device, smoke = _PROBE.acquire(timeout, backend, engine, asked)
        except Exception as err:
            raise _as_checker_fault(err) from None
        return cls(device, smoke, _PROBE)

    @property
    def smoke_tested(self) -> bool:
        """Whether real guest code ran (False where no smoke test exists yet)."""
        return self.smoke is not None and self.smoke.ok

    def fileno(self) -> int:
        """The open /dev/kvm descriptor; raises ValueError when there is none."""
        if self._device is None or self._device.closed:
            raise ValueError("no KVM descriptor (closed, or not Linux)")
        return self._device.fileno()

    def close(self) -> None:
        """Release the descriptor; safe to call more than once."""
        if self._device is not None:
            self._device.close()

    def __repr__(self) -> str:
        device = self._device
        state = "closed" if device is None or device.closed else f"fd {device.fileno()}"
        return f"<SystemCheck {self.describe()}; {state}>"

    def __enter__(self) -> SystemCheck:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """One line on what was proven."""
        smoke = self.smoke
        if smoke is None:
            if isinstance(self.probe, KvmProbe):
                return (
                    f"usable, not smoke-tested: {self.probe.path} opens read-write, but no guest "
                    f"code was run (no smoke test for {self.probe.machine} yet)"
                )
            return "usable: Hypervisor.framework is available"
        took = f"{smoke.backend} backend, {smoke.elapsed * 1e3:.2f} ms"
        if smoke.speed is not None:
            return (
                "usable: a 64-bit guest ran a stock kernel's early instructions at hardware "
                f"speed ({smoke.speed.describe()}; {took})"
            )
        if smoke.guest == "aarch64":
            return f"usable: KVM ran arm64 guest code and it wrote its proof value by MMIO ({took})"
        return f"usable: KVM ran guest code and it halted ({took})"


def diagnose_create_failure(
    error: BaseException,
    *,
    engine: str | None = DEFAULT_ENGINE,
    timeout: float = DEFAULT_TIMEOUT,
    log: str = "",
) -> BaseException:
    """The precise cause of an engine's failure to create or start a VM.

    Give it what the engine raised: BoxLite's SDK errors, 0.9's RuntimeError,
    even pyo3's PanicException (a BaseException), or one of ours; ``log``
    may add the engine's log lines (the shim's stderr, boxlite.log).  An
    error that is not the host's comes back unchanged, as BoxLite's own
    contract says.  For a host fault the host is checked again for
    ``engine``: the precise cause comes back as one of our errors (whose
    ``code`` is the SDK's code for its class) with the engine's error as
    ``__cause__``; when the host passes and the message decodes to nothing,
    the original comes back.  Never raises for a host problem.
    """
    try:
        return _PROBE.diagnose_create_failure(error, engine, timeout, log)
    except Exception as err:
        raise _as_checker_fault(err) from None


USABLE, USABLE_WITH_WARNINGS, NOT_USABLE = "usable", "usable-with-warnings", "not-usable"
VERDICTS = (USABLE, USABLE_WITH_WARNINGS, NOT_USABLE)
#: The JSON document's version: a field added keeps it; a field removed,
#: renamed or given another meaning or type bumps it (see the README).
SCHEMA_VERSION = 3


class Report:
    """The result of ``check()``: verdict, the error, findings and host facts.

    ``started`` is the Unix time the check began, ``duration_s`` how long
    it took.
    """

    def __init__(
        self,
        findings: list[Finding],
        error: BoxliteError | None,
        host: dict[str, object],
        *,
        started: float = 0.0,
        duration_s: float = 0.0,
    ) -> None:
        self.findings = findings
        self.error = error
        self.host = host
        self.started = started
        self.duration_s = duration_s

    @property
    def verdict(self) -> str:
        if self.error is not None or any(f.status == FAIL for f in self.findings):
            return NOT_USABLE
        if any(f.status == WARN for f in self.findings):
            return USABLE_WITH_WARNINGS
        return USABLE

    def __repr__(self) -> str:
        cause = f", cause {self.error.cause}" if self.error is not None else ""
        return f"<Report {self.verdict}{cause}, {len(self.findings)} findings>"

    @property
    def engines(self) -> dict[str, dict[str, object]]:
        """Each engine's verdict, by name (empty when none were checked)."""
        prefix = "engine."
        return {f.id[len(prefix) :]: f.evidence for f in self.findings if f.id.startswith(prefix)}

    @property
    def deep(self) -> dict[str, object] | None:
        """The deep boot's result (deep.boot's evidence), when it ran."""
        found = next((f for f in self.findings if f.id == "deep.boot"), None)
        if found is None or found.evidence.get("outcome") == BOOT_NOT_RUN:
            return None
        return found.evidence

    def as_dict(self) -> dict[str, object]:
        """The JSON document (see boxlite_syscheck.schema.json)."""
        return {
            **_document_head(True, self.started, self.duration_s),
            "verdict": self.verdict,
            "host": self.host,
            "error": _error_dict(self.error),
            "engines": self.engines,
            "findings": [f.as_dict() for f in self.findings],
        }


def _rfc3339(when: float) -> str:
    """A Unix time as RFC 3339 in UTC, to the second: 2026-12-02T10:00:00Z."""
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _document_head(success: bool, started: float, duration_s: float) -> dict[str, object]:
    return {
        "schema_version": SCHEMA_VERSION,
        "checker_version": __version__,
        "check_success": success,
        "timestamp": _rfc3339(started),
        "duration_seconds": round(duration_s, 6),
    }


def _error_dict(err: BoxliteError | None) -> dict[str, object] | None:
    if err is None:
        return None
    message = str(err)
    if err.fix and message.endswith("Fix: " + err.fix):  # said once, in "fix"
        message = message[: -len("Fix: " + err.fix)].rstrip()
    return {
        "type": type(err).__name__,
        "code": err.code,
        "cause": err.cause,
        "summary": err.summary,
        "message": message,
        "evidence": err.evidence,
        "fix": err.fix,
    }


def _failure_document(
    error: BoxliteError, engine: str | None, started: float, duration_s: float
) -> dict[str, object]:
    """The JSON document when the checker itself failed: no verdict, the
    checker's error, and the host facts that need no probe."""
    return {
        **_document_head(False, started, duration_s),
        "verdict": None,
        "host": _basic_host(engine),
        "error": _error_dict(error),
        "engines": {},
        "findings": [],
    }


def _basic_host(engine: str | None) -> dict[str, object]:
    """The host facts that need no probe (the checker may have failed)."""
    uname = os.uname()
    return {
        "host": uname.nodename,
        "system": uname.sysname,
        "kernel": uname.release,
        "machine": uname.machine,
        "python": sys.version.split()[0],
        "probe": _PROBE.name,
        "smoke_backend": None,
        "native_library": None,
        "kvm_provider": None,
        "engine": engine or "none",
    }


def _host_facts(probe: HypervisorProbe, facts: Facts) -> dict[str, object]:
    linux = isinstance(probe, KvmProbe)
    native, note = native_backend() if linux else (False, "")
    ran = facts.smoke.backend if facts.smoke is not None else None
    host = _basic_host(facts.engine)
    # The backend that ran, else the one that would run.
    host["smoke_backend"] = ran or (("native" if native else "python") if linux else None)
    host["native_library"] = note or None
    host["kvm_provider"] = facts.ev.kvm_provider if linux else None
    return host


def check(
    *,
    timeout: float = DEFAULT_TIMEOUT,
    backend: str | None = None,
    probe_hvf: bool = False,
    engine: str | None = DEFAULT_ENGINE,
    deep: bool = False,
    kernel: str | None = None,
    deep_timeout: float = DEEP_TIMEOUT,
) -> Report:
    """Run every probe and return a Report; never raises for a host problem.

    The layers are reported apart: the device works (``kvm.smoke``), guest
    code runs at hardware speed (``guest.speed``), a stock kernel's early
    instructions run (``guest.stock_kernel``), the boot MSRs are accepted
    (``guest.msrs``), and each engine's verdict.  The verdict and its cause
    are those SystemCheck.run() gives for ``engine``: the same facts, the
    same rules.  The checker's own failure raises InternalError.

    ``deep=True`` adds ``deep.boot``: the engine's kernel booted (see
    SystemCheck.run), even when a fast stage refused, so the two can be
    compared; the verdict keeps the first cause, in the gate's order.
    """
    import time

    _check_timeout(timeout)
    _check_engine(engine)
    asked = _deep_asked(deep, kernel, deep_timeout)
    started, clock = time.time(), time.perf_counter()
    try:
        facts = _PROBE.gather(engine, timeout, backend, probe_hvf, asked)
        error = _diagnose_staged(facts)
        findings = _PROBE.findings(facts, error)
        host = _host_facts(_PROBE, facts)
        took = time.perf_counter() - clock
        return Report(findings, error, host, started=started, duration_s=took)
    except Exception as err:
        raise _as_checker_fault(err) from None


# ── Renderers ───────────────────────────────────────────────────────────────

_COLOURS = {PASS: "32", WARN: "33", FAIL: "31", SKIP: "2", INFO: "36"}


def _paint(text: str, status: str, colour: bool) -> str:
    return f"\x1b[{_COLOURS[status]}m{text}\x1b[0m" if colour else text


def _text(report: Report, *, quiet: bool, colour: bool, prog: str = "boxlite_syscheck") -> str:
    """The human-readable report.

    ``quiet`` keeps the failures and the warnings (a fix is never shown
    without the finding it belongs to) and drops the header and verdict.
    """
    lines: list[str] = []
    host = report.host
    if not quiet:
        backend = host.get("smoke_backend")
        lines.append(
            f"{prog} {__version__}: {host['host']}, {host['system']} {host['kernel']} "
            f"{host['machine']}, Python {host['python']}"
            + (f", smoke test: {backend} backend" if backend else "")
        )
        lines.append("")
    shown = [f for f in report.findings if not quiet or f.status in (FAIL, WARN)]
    width = max((len(f.id) for f in shown), default=0)
    for finding in shown:
        label = _paint(f"{finding.status.upper():<4}", finding.status, colour)
        lines.append(f"  {label}  {finding.id:<{width}}  {finding.summary}")
    # The failure that carries the error is explained in full below; a fix
    # is said once.
    said = report.error.fix if report.error is not None else None
    fixes = [
        f for f in shown if f.fix and f.status in (FAIL, WARN) and f.error is None and f.fix != said
    ]
    if fixes:
        lines += ["", "How to fix:"]
        lines += [f"  {f.id}: {f.fix}" for f in fixes]
    if report.error is not None:
        lines += ["", str(report.error)]
    if not quiet:
        lines += ["", f"Verdict: {report.verdict}"]
    return "\n".join(lines)


class _Outcome:
    """One run for the fleet formats: the report, or the checker's failure
    (then no verdict is known), the engines' verdicts, and how it ran."""

    def __init__(
        self,
        report: Report | None,
        failure: BoxliteError | None,
        *,
        engines: dict[str, dict[str, object]] | None = None,
        engine: str | None = DEFAULT_ENGINE,
        strict: bool = False,
        started: float = 0.0,
        duration_s: float = 0.0,
    ) -> None:
        self.report = report
        self.failure = failure
        self.engines = engines if engines is not None else (report.engines if report else {})
        self.engine = engine or "none"
        self.strict = strict
        self.started = started
        self.duration_s = duration_s

    @property
    def usable(self) -> bool | None:
        """The gate's answer (``--strict`` counts a warning against it), or
        None when the checker failed."""
        if self.report is None:
            return None
        verdict = self.report.verdict
        return verdict == USABLE or (verdict == USABLE_WITH_WARNINGS and not self.strict)

    @property
    def cause(self) -> str:
        error = self.failure if self.report is None else self.report.error
        return error.cause if error is not None else "none"

    def static_facts(self) -> dict[str, str]:
        """What does not change between runs: the checker, the kernel, the KVM provider."""
        if self.report is not None:
            kernel, provider = self.report.host.get("kernel"), self.report.host.get("kvm_provider")
        else:  # the checker failed: read what can still be read, or say so
            kernel = os.uname().release
            try:
                provider = Evidence(KVM_DEVICE).kvm_provider if _PROBE.platform == "linux" else None
            except Exception:
                provider = "unknown"
        return {
            "version": __version__,
            "kernel": str(kernel),
            "kvm_provider": str(provider or "none"),
        }


def _prometheus_label(text: object) -> str:
    """A Prometheus label value, escaped (text exposition format 0.0.4)."""
    return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _cause_ids() -> list[str]:
    """Every cause the registry can name, and "none": the cause metric's states."""
    return ["none", *sorted({key.split("/")[0] for key in _causes()})]


def _prometheus(run: _Outcome) -> str:
    """The node_exporter textfile-collector format (text exposition 0.0.4).

    Always: whether the check ran, when, how long, and static facts; with a
    verdict, the gate's answer, the verdict and the cause as state sets
    (every state present, the one that holds 1), and each engine's.
    """
    lines: list[str] = []

    def family(name: str, about: str, samples: Iterable[tuple[dict[str, str], str]]) -> None:
        lines.append(f"# HELP boxlite_syscheck_{name} {about}")
        lines.append(f"# TYPE boxlite_syscheck_{name} gauge")
        for labels, value in samples:
            text = ",".join(f'{k}="{_prometheus_label(v)}"' for k, v in labels.items())
            lines.append(
                f"boxlite_syscheck_{name}{{{text}}} {value}"
                if text
                else f"boxlite_syscheck_{name} {value}"
            )

    def states(label: str, names: Iterable[str], holds: str) -> list[tuple[dict[str, str], str]]:
        return [({label: name}, "1" if name == holds else "0") for name in names]

    report = run.report
    family(
        "check_success",
        "Whether the check ran to a verdict (1) or the checker itself failed (0), which says nothing about the host.",
        [({}, "1" if report is not None else "0")],
    )
    family(
        "last_run_timestamp_seconds",
        "When the check ran, in seconds since the Unix epoch.",
        [({}, f"{run.started:.3f}")],
    )
    family(
        "check_duration_seconds",
        "How long the check took, in seconds.",
        [({}, f"{run.duration_s:.6f}")],
    )
    family(
        "info",
        "The checker and the host it ran on: facts that do not change between runs.",
        [(run.static_facts(), "1")],
    )
    family(
        "cause",
        "The cause of the verdict, one series per cause the checker knows; the one that holds is 1: none when the host passed, the checker's own cause (checker-failed, native-missing) when it failed.",
        states("cause", _cause_ids(), run.cause),
    )
    if report is not None:
        family(
            "usable",
            "Whether this host can run the engine's real guests (1) or not (0); with --strict a warning counts as not usable.",
            [({"engine": run.engine}, "1" if run.usable else "0")],
        )
        family(
            "strict",
            "Whether warnings counted as not usable (--strict) in boxlite_syscheck_usable.",
            [({}, "1" if run.strict else "0")],
        )
        family(
            "verdict",
            "The verdict, one series per state; the one that holds is 1.",
            states("verdict", VERDICTS, report.verdict),
        )
    if run.engines:
        family(
            "engine_would_run",
            "Whether each engine would start and run a stock guest here (1) or not (0).",
            [
                ({"engine": name}, "1" if row["verdict"] == WOULD_RUN else "0")
                for name, row in run.engines.items()
            ],
        )
        family(
            "engine_verdict",
            "Each engine's verdict, one series per state; the one that holds is 1.",
            [
                ({"engine": name, "verdict": state}, "1" if row["state"] == state else "0")
                for name, row in run.engines.items()
                for state in ENGINE_STATES.values()
            ],
        )
    deep = report.deep if report is not None else None
    if deep is not None:
        milestones = deep["milestones_s"]
        assert isinstance(milestones, dict)
        family(
            "deep_boot_success",
            "Whether the engine's own kernel booted to its root-mount panic under this KVM (--deep).",
            [({}, "1" if deep["outcome"] == BOOTED else "0")],
        )
        family(
            "deep_boot_outcome",
            "How the deep boot ended, one series per outcome; the one that holds is 1.",
            states("outcome", BOOT_OUTCOMES, str(deep["outcome"])),
        )
        family(
            "deep_boot_milestone_seconds",
            "When the deep boot reached each milestone, in seconds from VM creation.",
            [({"milestone": name}, f"{at:.4f}") for name, at in milestones.items()],
        )
        family(
            "deep_boot_kvm_exits",
            "The KVM exits the deep boot made.",
            [({}, str(deep["kvm_exits"]))],
        )
        family(
            "deep_boot_guest_memory_bytes",
            "The guest memory the deep boot gave the kernel.",
            [({}, str(deep["guest_memory_bytes"]))],
        )
    return "\n".join(lines)


def _k8s_label_value(text: object) -> str:
    """A Kubernetes label value: [A-Za-z0-9][-A-Za-z0-9_.]*[A-Za-z0-9], at most 63."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-_.")[:63].strip("-_.")


NFD_PREFIX = "feature.node.kubernetes.io/"
DEFAULT_NFD_EXPIRY = 3600.0


def _nfd(run: _Outcome, expiry_s: float = DEFAULT_NFD_EXPIRY) -> str:
    """A Node Feature Discovery local feature file (features.d): fully
    qualified labels, one a line, after an expiry directive so a file the
    check stopped rewriting retires."""
    labels = {"boxlite-kvm-checked": "true" if run.report is not None else "false"}
    if run.report is not None:
        labels["boxlite-kvm-usable"] = "true" if run.usable else "false"
        labels["boxlite-kvm-verdict"] = run.report.verdict
    labels["boxlite-kvm-engine"] = run.engine
    labels["boxlite-kvm-cause"] = run.cause
    labels["boxlite-kvm-provider"] = run.static_facts()["kvm_provider"]
    for name, row in run.engines.items():
        labels[f"boxlite-kvm-{name}"] = "true" if row["verdict"] == WOULD_RUN else "false"
    deep = run.report.deep if run.report is not None else None
    if deep is not None:
        labels["boxlite-kvm-deep-boot"] = "true" if deep["outcome"] == BOOTED else "false"
    lines = [f"# +expiry-time={_rfc3339(run.started + expiry_s)}"]
    lines += [f"{NFD_PREFIX}{key}={_k8s_label_value(value)}" for key, value in labels.items()]
    return "\n".join(lines)


def _write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old file or
    the new one, never a part: a dot-file in the same directory (which NFD
    and node_exporter's textfile collector skip), fsync, rename, fsync the
    directory.  When writing fails the old file is untouched, the temporary
    removed, and the OSError raised."""
    import contextlib

    directory, name = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    for attempt in range(100):
        temporary = os.path.join(directory, f".{name}.{os.getpid()}-{attempt}.tmp")
        try:
            fd = os.open(temporary, flags, 0o644)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(errno.EEXIST, "no free temporary name", temporary)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    folder = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(folder)
    except OSError as err:
        if err.errno != errno.EINVAL:  # a file system that cannot sync a directory
            raise
    finally:
        os.close(folder)


# ── Command line ────────────────────────────────────────────────────────────

EXIT_USABLE, EXIT_NOT_USABLE, EXIT_USAGE, EXIT_CHECKER_FAILED = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 128 + 13  # what a tool killed by SIGPIPE reports


def _prog() -> str:
    """The name this command was run by, for usage lines and messages."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "boxlite-syscheck" if name == "boxlite-syscheck" else "boxlite_syscheck"


def _colour_wanted() -> bool:
    """Colour only on a terminal, never with a non-empty NO_COLOR or TERM=dumb."""
    terminal = sys.stdout.isatty()
    return terminal and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


class _Option:
    """One command-line option: its names, where its value goes, and help."""

    __slots__ = ("choices", "const", "dest", "help", "kind", "metavar", "names")

    def __init__(
        self,
        names: str,
        help: str,
        *,
        dest: str = "",
        kind: str = "flag",
        choices: tuple[str, ...] = (),
        const: object = True,
        metavar: str = "",
    ) -> None:
        self.names = names.split()
        self.dest = dest or self.names[-1].lstrip("-").replace("-", "_")
        self.kind = kind  # flag, const, value (a string or a choice), number, help, version
        self.choices, self.const, self.metavar, self.help = choices, const, metavar, help

    @property
    def usage(self) -> str:
        name = self.names[0] if self.names[0].startswith("--") else self.names[-1]
        if self.kind in ("value", "number"):
            return f"{name} {self.shown}"
        return name

    @property
    def shown(self) -> str:
        return "{" + ",".join(self.choices) + "}" if self.choices else self.metavar


FORMATS = ("text", "json", "prometheus", "nfd")

#: The command line, as data: parsing, --help and the usage line come from it.
_OPTIONS = (
    _Option("-h --help", "show this help and exit", kind="help"),
    _Option(
        "--format",
        "text (default), json, prometheus (node_exporter textfile) or nfd (Node Feature "
        "Discovery features.d)",
        kind="value",
        choices=FORMATS,
    ),
    _Option("--json", "--format json", dest="format", kind="const", const="json"),
    _Option("-q --quiet", "text: print only failures and warnings"),
    _Option("--strict", "count warnings as failure"),
    _Option(
        "-o --output",
        "write the report to FILE atomically (a dot-file beside it, fsync, rename); the last "
        "good FILE stays when writing fails",
        kind="value",
        metavar="FILE",
    ),
    _Option(
        "--gate",
        "prometheus, nfd: exit 1 when not usable and 3 when the checker failed, as text and "
        "json do",
    ),
    _Option(
        "--expiry",
        f"nfd: the labels expire this long after the run (default {DEFAULT_NFD_EXPIRY:g})",
        kind="number",
        metavar="SECONDS",
    ),
    _Option(
        "--timeout",
        f"bound on running the guest (default {DEFAULT_TIMEOUT:g})",
        kind="number",
        metavar="SECONDS",
    ),
    _Option(
        "--backend",
        "force a smoke-test backend (default: native if built)",
        kind="value",
        choices=("native", "python"),
    ),
    _Option(
        "--engine",
        "whose real guest must run (default: libkrun, BoxLite's engine); 'none' checks only "
        "that the device works",
        kind="value",
        choices=(*ENGINES, "none"),
    ),
    _Option(
        "--deep",
        "also boot the engine's own kernel in a throwaway VM, to its root-mount panic (x86_64; "
        "seconds, not milliseconds)",
    ),
    _Option(
        "--kernel",
        "--deep: the kernel to boot: libkrunfw's library, a vmlinux or a bzImage (default: the "
        "newest libkrunfw BoxLite extracted)",
        kind="value",
        metavar="PATH",
    ),
    _Option(
        "--deep-timeout",
        f"--deep: bound on the boot (default {DEEP_TIMEOUT:g})",
        kind="number",
        metavar="SECONDS",
    ),
    _Option("--probe-hvf", "macOS: also call hv_vm_create()"),
    _Option("--version", "print the version and exit", kind="version"),
)
_DEFAULTS: dict[str, object] = {
    "format": "text",
    "output": None,
    "expiry": None,
    "timeout": DEFAULT_TIMEOUT,
    "backend": None,
    "engine": DEFAULT_ENGINE,
    "kernel": None,
    "deep_timeout": None,
}
_DESCRIPTION = (
    "Check that this host can run hardware-accelerated VMs, by running real guest code under "
    "KVM (Linux) or asking Hypervisor.framework (macOS)."
)
_EPILOG = (
    "Exit codes, text and json: 0 usable, 1 not usable, 2 usage error, 3 the checker failed, "
    "141 standard output closed.  prometheus and nfd: 0 whenever the whole report was written "
    "(the verdict, or the checker's failure, is in the data), 2 usage error, 3 nothing could be "
    "written; --gate gives them the exit codes of text and json."
)


class _Usage(Exception):
    """A usage error (exit 2), or --help/--version (exit 0) with what to print."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class _Args:
    """The parsed command line: one attribute per option."""

    def __init__(self, values: dict[str, object]) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:  # for the type checker: every option is set
        raise AttributeError(name)


def _parse_args(argv: Sequence[str], prog: str) -> _Args:
    """The options, parsed; a _Usage for errors, --help and --version.

    Hand-written rather than argparse, whose import and set-up cost more
    than the rest of a check: exact option names, ``--name value`` or
    ``--name=value``, no positional arguments.
    """
    values: dict[str, object] = {o.dest: False for o in _OPTIONS if o.kind in ("flag", "const")}
    values.update(_DEFAULTS)
    names = {name: option for option in _OPTIONS for name in option.names}
    words = list(argv)
    while words:
        word = words.pop(0)
        name, equals, inline = word.partition("=") if word.startswith("--") else (word, "", "")
        option = names.get(name)
        if option is None:
            raise _Usage(f"unrecognized argument: {word}")
        if option.kind not in ("value", "number"):
            if equals:
                raise _Usage(f"argument {name}: takes no value (got {inline!r})")
            if option.kind == "help":
                raise _Usage(_help(prog), EXIT_USABLE)
            if option.kind == "version":
                raise _Usage(f"{prog} {__version__}", EXIT_USABLE)
            values[option.dest] = option.const
            continue
        if not equals:
            if not words:
                raise _Usage(f"argument {name}: expected one argument ({option.shown})")
            inline = words.pop(0)
        if option.choices and inline not in option.choices:
            raise _Usage(
                f"argument {name}: invalid choice {inline!r} (choose from {', '.join(option.choices)})"
            )
        if option.kind == "number":
            try:
                values[option.dest] = float(inline)
            except ValueError:
                raise _Usage(f"argument {name}: not a number: {inline!r}") from None
        else:
            values[option.dest] = inline
    return _Args(values)


def _usage_line(prog: str) -> str:
    import textwrap

    usage = f"usage: {prog} " + " ".join(f"[{option.usage}]" for option in _OPTIONS)
    return textwrap.fill(usage, 79, subsequent_indent=" " * 8, break_on_hyphens=False)


def _help(prog: str) -> str:
    import textwrap

    lines = [_usage_line(prog), ""]
    lines += [textwrap.fill(_DESCRIPTION, 79), "", "options:"]
    for option in _OPTIONS:
        head = ", ".join(
            f"{name} {option.shown}" if option.kind in ("value", "number") else name
            for name in option.names
        )
        body = textwrap.wrap(option.help, 79 - 24)
        if len(head) <= 20:
            lines.append(f"  {head:<20}  {body[0]}")
        else:
            lines += [f"  {head}", " " * 24 + body[0]]
        lines += [" " * 24 + more for more in body[1:]]
    lines += ["", textwrap.fill(_EPILOG, 79)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check from the command line; return the exit code."""
    prog = _prog()
    _hold_for_exit()  # the probe VMs' teardown is not the user's wait
    try:
        return _main(prog, argv)
    except Exception as err:  # the checker's own failure is never a verdict
        print(f"{prog}: the checker failed: {_failure_text(err)}", file=sys.stderr)
        return EXIT_CHECKER_FAILED
    finally:
        _hand_off_at_exit()


def _failure_text(err: BaseException) -> str:
    if isinstance(err, InternalError):
        return f"{err.summary}; fix: {err.fix}"
    return f"{type(err).__name__}: {err}; this says nothing about the host"


def _usage_error(args: Any) -> str | None:
    """What is wrong with the arguments argparse accepted, or None."""
    if args.quiet and args.format != "text":
        return "--quiet applies to the text report only"
    if args.expiry is not None and args.format != "nfd":
        return "--expiry applies to --format nfd only"
    if args.expiry is not None and not (0 < args.expiry <= 366 * 86400):
        return "--expiry: give a number of seconds, more than 0 and at most a year"
    if args.gate and args.format not in ("prometheus", "nfd"):
        return "--gate applies to --format prometheus and nfd (text and json always gate)"
    if not args.deep and (args.kernel is not None or args.deep_timeout is not None):
        return "--kernel and --deep-timeout go with --deep"
    if args.deep_timeout is not None:
        try:
            _check_deep_timeout(args.deep_timeout)
        except InvalidArgumentError as err:
            return f"--deep-timeout: {err.detail}"
    if args.output is not None and args.output != "-" and os.path.isdir(args.output):
        return f"--output: {args.output} is a directory; name the file to write"
    try:
        _check_timeout(args.timeout)
    except InvalidArgumentError as err:
        return f"--timeout: {err.detail}"
    return None


def _main(prog: str, argv: Sequence[str] | None) -> int:
    import time

    try:
        args = _parse_args(sys.argv[1:] if argv is None else argv, prog)
        wrong = _usage_error(args)
        if wrong is not None:
            raise _Usage(wrong)
    except _Usage as usage:
        if usage.code == EXIT_USABLE:  # --help, --version
            print(usage)
        else:
            print(f"{_usage_line(prog)}\n{prog}: error: {usage}", file=sys.stderr)
        return usage.code
    if args.probe_hvf and not isinstance(_PROBE, HvfProbe):
        print(f"{prog}: note: --probe-hvf applies to macOS only; ignored here", file=sys.stderr)
    fleet = args.format in ("prometheus", "nfd")
    engine = None if args.engine == "none" else args.engine
    started, clock = time.time(), time.perf_counter()
    report, failure, engines = None, None, None
    deep = {
        "deep": args.deep,
        "kernel": args.kernel,
        "deep_timeout": DEEP_TIMEOUT if args.deep_timeout is None else args.deep_timeout,
    }
    try:
        report = check(
            timeout=args.timeout,
            backend=args.backend,
            probe_hvf=args.probe_hvf,
            engine=engine,
            **deep,
        )
        if fleet and engine is None and isinstance(_PROBE, KvmProbe):
            # The fleet labels say which engines would run, whatever --engine chose.
            engines = check(timeout=args.timeout, backend=args.backend).engines
    except InvalidArgumentError as err:  # a kernel that is not one, say
        print(f"{_usage_line(prog)}\n{prog}: error: {err.detail}", file=sys.stderr)
        return EXIT_USAGE
    except InternalError as err:
        failure = err
        print(f"{prog}: the checker failed: {_failure_text(err)}", file=sys.stderr)
    duration_s = time.perf_counter() - clock
    if report is not None:
        started = report.started
    run = _Outcome(
        report,
        failure,
        engines=engines,
        engine=engine,
        strict=args.strict,
        started=started,
        duration_s=duration_s,
    )
    text = _rendered(run, args, prog)
    if text is not None:
        written = _emit(text, args.output, prog)
        if written is not None:
            return written
    if failure is not None:
        return EXIT_USABLE if fleet and not args.gate else EXIT_CHECKER_FAILED
    assert report is not None
    if args.strict and report.verdict == USABLE_WITH_WARNINGS:
        print(f"{prog}: --strict: warnings count as not usable", file=sys.stderr)
    if fleet and not args.gate:
        return EXIT_USABLE
    return EXIT_USABLE if run.usable else EXIT_NOT_USABLE


def _rendered(run: _Outcome, args: Any, prog: str) -> str | None:
    """The report in the chosen format; None when there is nothing to say
    (the checker failed and the text report has no data to carry it)."""
    if args.format == "prometheus":
        return _prometheus(run) + "\n"
    if args.format == "nfd":
        return _nfd(run, DEFAULT_NFD_EXPIRY if args.expiry is None else args.expiry) + "\n"
    if args.format == "json":
        import json

        if run.report is not None:
            document = run.report.as_dict()
        else:
            assert run.failure is not None
            document = _failure_document(run.failure, run.engine, run.started, run.duration_s)
        document["duration_seconds"] = round(run.duration_s, 6)
        return json.dumps(document, indent=2, default=str) + "\n"
    if run.report is None:
        return None
    colour = _colour_wanted() and args.output in (None, "-")
    text = _text(run.report, quiet=args.quiet, colour=colour, prog=prog)
    return text + "\n" if text else ""


def _emit(text: str, output: str | None, prog: str) -> int | None:
    """Write the report to standard output or, atomically, to ``output``;
    None when it was written, else the exit code."""
    if output is not None and output != "-":
        try:
            _write_atomically(output, text.encode())
        except OSError as err:
            name = errno_name(err.errno or 0)
            print(
                f"{prog}: cannot write the report to {output}: {name} ({err.strerror}); the "
                "file there, if any, is as it was",
                file=sys.stderr,
            )
            return EXIT_CHECKER_FAILED
        return None
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): quiet, as other tools are.  Point
        # stdout at /dev/null so the interpreter's final flush says nothing.
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as err:
        print(f"{prog}: cannot write the report: {errno_name(err.errno or 0)}", file=sys.stderr)
        _silence_stdout()
        return EXIT_CHECKER_FAILED
    return None


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def console() -> None:
    """The command (``boxlite-syscheck``, ``python -m boxlite_syscheck``):
    main(), then exit at once.  Everything the check holds is the kernel's
    to release, and the interpreter's own shutdown (freeing every module,
    object by object) would add milliseconds the user waits for, so the
    streams are flushed and the process ends with os._exit."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            code = code or EXIT_BROKEN_PIPE
        except (OSError, ValueError):
            code = code or EXIT_CHECKER_FAILED
    os._exit(code)


if __name__ == "__main__":
    console()
