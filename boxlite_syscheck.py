"""Can this host run hardware-accelerated virtual machines, and if not, why?

boxlite_syscheck is a Python port of the host check that BoxLite 0.9.1 runs
before it starts a micro-VM.  It does not guess from CPU flags, and "usable"
means a real guest can run: on Linux it opens ``/dev/kvm`` the way a VMM
will, checks the capabilities the engine needs, enters 64-bit long mode in a
throwaway VM as direct-boot VMMs do, runs what a stock kernel runs early
(``lock cmpxchg16b``, ``xsave``...) and times guest code against the host
CPU, every run bounded in time (arm64: a guest that proves itself by MMIO);
on macOS it asks the kernel whether Hypervisor.framework is available.  When
the host cannot run VMs, the error names what was tried, what the operating
system answered and the one fix for that cause.

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
failed, 141 standard output closed.  The module is one file with no dependencies outside the standard
library; copy it into a project as it is.  ``libkvmsmoke.so`` (built by
``make`` from ``kvm_smoke.c``) is used when it sits next to this file, or at
the absolute path in ``$BOXLITE_SYSCHECK_KVMSMOKE``; without it a pure-Python
backend with the same contract runs the smoke test.
"""

from __future__ import annotations

import _thread
import errno
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
    "hypervisor_probe",
    "main",
    "smoke_test",
]

__version__ = "0.1.0"

# Lets mypy see the imports below without paying for them at import time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any

# ── Constants and kernel ABI ────────────────────────────────────────────────

KVM_DEVICE = "/dev/kvm"
#: How long KVM_RUN may take before the smoke test gives up, in seconds.
DEFAULT_TIMEOUT = 2.0
#: Names an absolute path to libkvmsmoke.so, used instead of the copy next to
#: this file.  Relative paths are refused: native code is never searched for.
LIBRARY_ENV = "BOXLITE_SYSCHECK_KVMSMOKE"
_LIBRARY_NAME = "libkvmsmoke.so"
#: The native library must report this ABI version (KVMSMOKE_ABI_VERSION).
_NATIVE_ABI_VERSION = 3

# include/uapi/linux/kvm.h: KVM_API_VERSION has been 12 since Linux 2.6.22.
KVM_API_VERSION = 12
# misc device major and KVM's minor (include/linux/miscdevice.h KVM_MINOR).
KVM_DEVICE_MAJOR = 10
KVM_DEVICE_MINOR = 232

# include/uapi/asm-generic/ioctl.h (x86 and arm64 use the generic layout).
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """Encode an ioctl request number as the kernel's _IOC() macro does."""
    return (
        (direction << _IOC_DIRSHIFT)
        | (kind << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


_KVMIO = 0xAE
# Sizes of the x86_64 structures (arch/x86/include/uapi/asm/kvm.h); the
# ctypes definitions in _abi() are checked against them in the tests.
_SIZEOF_KVM_REGS = 144
_SIZEOF_KVM_SREGS = 312
_SIZEOF_KVM_USERSPACE_MEMORY_REGION = 32
_SIZEOF_KVM_SIGNAL_MASK = 4
_SIZEOF_KVM_MSR_LIST = 4  # struct kvm_msr_list header: nmsrs
_SIZEOF_KVM_CPUID2 = 8  # struct kvm_cpuid2 header: nent, padding
_SIZEOF_KVM_MSRS = 8  # struct kvm_msrs header: nmsrs, pad

KVM_GET_API_VERSION = _ioc(_IOC_NONE, _KVMIO, 0x00, 0)
KVM_CREATE_VM = _ioc(_IOC_NONE, _KVMIO, 0x01, 0)
KVM_GET_MSR_INDEX_LIST = _ioc(_IOC_READ | _IOC_WRITE, _KVMIO, 0x02, _SIZEOF_KVM_MSR_LIST)
KVM_CHECK_EXTENSION = _ioc(_IOC_NONE, _KVMIO, 0x03, 0)
KVM_GET_VCPU_MMAP_SIZE = _ioc(_IOC_NONE, _KVMIO, 0x04, 0)
KVM_GET_SUPPORTED_CPUID = _ioc(_IOC_READ | _IOC_WRITE, _KVMIO, 0x05, _SIZEOF_KVM_CPUID2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _ioc(
    _IOC_READ | _IOC_WRITE, _KVMIO, 0x0A, _SIZEOF_KVM_MSR_LIST
)
KVM_CREATE_VCPU = _ioc(_IOC_NONE, _KVMIO, 0x41, 0)
KVM_SET_USER_MEMORY_REGION = _ioc(
    _IOC_WRITE, _KVMIO, 0x46, _SIZEOF_KVM_USERSPACE_MEMORY_REGION
)
KVM_RUN = _ioc(_IOC_NONE, _KVMIO, 0x80, 0)
KVM_GET_REGS = _ioc(_IOC_READ, _KVMIO, 0x81, _SIZEOF_KVM_REGS)
KVM_SET_REGS = _ioc(_IOC_WRITE, _KVMIO, 0x82, _SIZEOF_KVM_REGS)
KVM_GET_SREGS = _ioc(_IOC_READ, _KVMIO, 0x83, _SIZEOF_KVM_SREGS)
KVM_SET_SREGS = _ioc(_IOC_WRITE, _KVMIO, 0x84, _SIZEOF_KVM_SREGS)
KVM_GET_MSRS = _ioc(_IOC_READ | _IOC_WRITE, _KVMIO, 0x88, _SIZEOF_KVM_MSRS)
KVM_SET_MSRS = _ioc(_IOC_WRITE, _KVMIO, 0x89, _SIZEOF_KVM_MSRS)
KVM_SET_SIGNAL_MASK = _ioc(_IOC_WRITE, _KVMIO, 0x8B, _SIZEOF_KVM_SIGNAL_MASK)
KVM_SET_CPUID2 = _ioc(_IOC_WRITE, _KVMIO, 0x90, _SIZEOF_KVM_CPUID2)
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

# KVM_CHECK_EXTENSION capabilities that VMMs rely on (include/uapi/linux/kvm.h).
KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IMMEDIATE_EXIT = 136
#: KVM_CAP_* numbers by name, for the capabilities the engines ask about.
KVM_CAPS = {
    "IRQCHIP": 0, "USER_MEMORY": 3, "SET_TSS_ADDR": 4, "EXT_CPUID": 7, "NR_VCPUS": 9,
    "NR_MEMSLOTS": 10, "MP_STATE": 14, "DESTROY_MEMORY_REGION_WORKS": 21, "USER_NMI": 22,
    "IRQ_ROUTING": 25, "JOIN_MEMORY_REGIONS_WORKS": 30, "MCE": 31, "IRQFD": 32, "PIT2": 33,
    "PIT_STATE2": 35, "IOEVENTFD": 36, "SET_IDENTITY_MAP_ADDR": 37, "ADJUST_CLOCK": 39,
    "INTERNAL_ERROR_DATA": 40, "VCPU_EVENTS": 41, "DEBUGREGS": 50,
    "X86_ROBUST_SINGLESTEP": 51, "XSAVE": 55, "XCRS": 56, "TSC_CONTROL": 60,
    "GET_TSC_KHZ": 61, "MAX_VCPUS": 66, "ONE_REG": 70, "TSC_DEADLINE_TIMER": 72,
    "SIGNAL_MSI": 77, "DEVICE_CTRL": 89, "ARM_PSCI_0_2": 102, "SPLIT_IRQCHIP": 121,
    "IOEVENTFD_ANY_LENGTH": 122, "X2APIC_API": 129, "IMMEDIATE_EXIT": 136,
    "ARM_VM_IPA_SIZE": 165, "XSAVE2": 208, "COUNTER_OFFSET": 227,
}  # fmt: skip
KVM_CAP_NAMES = {number: name for name, number in KVM_CAPS.items()}

# VM ioctls the engines issue at start-up (include/uapi/linux/kvm.h).
_SIZEOF_KVM_PIT_CONFIG = 64
_SIZEOF_KVM_ENABLE_CAP = 104
KVM_SET_TSS_ADDR = _ioc(_IOC_NONE, 0xAE, 0x47, 0)
KVM_SET_IDENTITY_MAP_ADDR = _ioc(_IOC_WRITE, 0xAE, 0x48, 8)
KVM_CREATE_IRQCHIP = _ioc(_IOC_NONE, 0xAE, 0x60, 0)
KVM_CREATE_PIT2 = _ioc(_IOC_WRITE, 0xAE, 0x77, _SIZEOF_KVM_PIT_CONFIG)
KVM_ENABLE_CAP = _ioc(_IOC_WRITE, 0xAE, 0xA3, _SIZEOF_KVM_ENABLE_CAP)

# struct kvm_run offsets (include/uapi/linux/kvm.h).
_RUN_EXIT_REASON = 8
_RUN_FAIL_ENTRY_REASON = 32  # fail_entry.hardware_entry_failure_reason, u64
_RUN_FAIL_ENTRY_CPU = 40  # fail_entry.cpu, u32
_RUN_INTERNAL_SUBERROR = 32  # internal.suberror, u32
_RUN_INTERNAL_NDATA = 36  # internal.ndata, u32
_RUN_INTERNAL_DATA = 40  # internal.data[16], u64
_RUN_EMULATION_INSN_SIZE = 48  # emulation_failure.insn_size, u8
_RUN_EMULATION_INSN_BYTES = 49  # emulation_failure.insn_bytes[15]
_SIZEOF_KVM_RUN_MIN = 2352
_RUN_HEAD = 288  # the bytes of kvm_run both backends copy out after a run
# KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: the failure carries them.
_EMULATION_FLAG_INSTRUCTION_BYTES = 1

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
# kvm_run.mmio: phys_addr (u64), data[8], len (u32), is_write (u8).
_RUN_MMIO_ADDR, _RUN_MMIO_DATA, _RUN_MMIO_LEN, _RUN_MMIO_WRITE = 32, 40, 48, 52
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17

#: KVM_EXIT_* names by number, from include/uapi/linux/kvm.h.
EXIT_REASONS = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG",
    5: "HLT", 6: "MMIO", 7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN",
    9: "FAIL_ENTRY", 10: "INTR", 11: "SET_TPR", 12: "TPR_ACCESS",
    13: "S390_SIEIC", 14: "S390_RESET", 15: "DCR", 16: "NMI",
    17: "INTERNAL_ERROR", 18: "OSI", 19: "PAPR_HCALL", 20: "S390_UCONTROL",
    21: "WATCHDOG", 22: "S390_TSCH", 23: "EPR", 24: "SYSTEM_EVENT",
    25: "S390_STSI", 26: "IOAPIC_EOI", 27: "HYPERV", 28: "ARM_NISV",
    29: "X86_RDMSR", 30: "X86_WRMSR", 31: "DIRTY_RING_FULL",
    32: "AP_RESET_HOLD", 33: "X86_BUS_LOCK", 34: "XEN", 35: "RISCV_SBI",
    36: "RISCV_CSR", 37: "NOTIFY",
}  # fmt: skip

#: KVM_INTERNAL_ERROR_* suberrors (include/uapi/linux/kvm.h).
INTERNAL_SUBERRORS = {
    1: "EMULATION",
    2: "SIMUL_EX",
    3: "DELIVERY_EV",
    4: "UNEXPECTED_EXIT_REASON",
}

# Smoke-test steps.  Each operation the backends execute carries its step, so
# a failure is reported as "step, errno" whatever the backend.
STEP_OPEN = 0
STEP_API_VERSION = 1
STEP_CREATE_VM = 2
STEP_GUEST_MEMORY = 3
STEP_MEMORY_REGION = 4
STEP_CREATE_VCPU = 5
STEP_GET_CPUID = 6
STEP_SET_CPUID = 7
STEP_GET_SREGS = 8
STEP_SET_SREGS = 9
STEP_SET_REGS = 10
STEP_RUN_AREA_SIZE = 11
STEP_MAP_RUN_AREA = 12
STEP_SET_MSRS = 13
STEP_ARM_TIMER = 14
STEP_RUN = 15
STEP_GET_REGS = 16
STEP_ARM_TARGET = 17
STEP_ARM_VCPU_INIT = 18
STEP_SET_ONE_REG = 19
STEP_GET_ONE_REG = 20
STEP_DONE = 21

#: What each step does, as said in messages.
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
    "done",
)

#: The guest puts this in EAX before HLT; reading it back proves it ran.
PROOF_VALUE = 0xB0C5117E
# 16-bit real mode: "mov eax, PROOF_VALUE" (operand-size prefix 66 B8 imm32),
# then "hlt" (F4).
_GUEST_HALT = b"\x66\xb8" + PROOF_VALUE.to_bytes(4, "little") + b"\xf4"
# "jmp $" (EB FE): a guest that never halts, for the timeout tests.
_GUEST_SPIN = b"\xeb\xfe"
# Architectures with a smoke test: x86 (real and long mode) and arm64.
_SMOKE_MACHINES = frozenset({"x86_64", "amd64", "aarch64", "arm64"})
# The arm64 guest, at guest physical 0x10000 (little-endian words): movz x0,
# #0x117e; movk x0, #0xb0c5, lsl #16; movz x1, #0x10, lsl #16; str w0, [x1];
# b .  It writes the proof value to 0x100000, where there is no memory: KVM
# exits with KVM_EXIT_MMIO, and X0 holds the value.
_ARM64_CODE = (0xD2822FC0, 0xF2B618A0, 0xD2A00201, 0xB9000020, 0x14000000)
_ARM64_BASE, _ARM64_MMIO = 0x10000, 0x100000

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
    "libkrun": {
        "required": {"x86_64": ("IRQCHIP", "IOEVENTFD", "IRQFD", "USER_MEMORY", "SET_TSS_ADDR"),
                     "aarch64": ("IRQCHIP", "IOEVENTFD", "IRQFD", "USER_MEMORY", "ARM_PSCI_0_2")},
        "optional": {"x86_64": ("SPLIT_IRQCHIP",)},
        "ioctls": ("KVM_SET_TSS_ADDR", "KVM_CREATE_IRQCHIP", "KVM_CREATE_PIT2"),
        "devices": {},
        "boot": "direct 64-bit",
    },
    # firecracker src/vmm/src/arch/x86_64/kvm.rs and arch/aarch64/kvm.rs
    # DEFAULT_CAPABILITIES; src/vmm/src/vstate/kvm.rs ("Missing KVM
    # capabilities: {0:#x?}"); src/vmm/src/arch/x86_64/vm.rs (TSS, irqchip, PIT2).
    "firecracker": {
        "required": {"x86_64": ("IRQCHIP", "IOEVENTFD", "IRQFD", "USER_MEMORY", "SET_TSS_ADDR",
                                "PIT2", "PIT_STATE2", "ADJUST_CLOCK", "DEBUGREGS", "MP_STATE",
                                "VCPU_EVENTS", "XCRS", "XSAVE", "EXT_CPUID"),
                     "aarch64": ("IOEVENTFD", "IRQFD", "USER_MEMORY", "ARM_PSCI_0_2",
                                 "DEVICE_CTRL", "MP_STATE", "ONE_REG")},
        "optional": {"x86_64": ("TSC_CONTROL", "GET_TSC_KHZ", "XSAVE2"),
                     "aarch64": ("COUNTER_OFFSET",)},
        "ioctls": ("KVM_SET_TSS_ADDR", "KVM_CREATE_IRQCHIP", "KVM_CREATE_PIT2"),
        "devices": {"networking": "/dev/net/tun"},
        "boot": "direct 64-bit",
    },
    # cloud-hypervisor hypervisor/src/kvm/x86_64/mod.rs and aarch64/mod.rs
    # check_required_kvm_extensions(); hypervisor/src/kvm/mod.rs (identity
    # map, TSS and split irqchip set with unwrap: a failure is a panic).
    "cloud-hypervisor": {
        "required": {"x86_64": ("ADJUST_CLOCK", "EXT_CPUID", "GET_TSC_KHZ", "IMMEDIATE_EXIT",
                                "IOEVENTFD", "IRQCHIP", "IRQFD", "IRQ_ROUTING", "MP_STATE",
                                "SET_IDENTITY_MAP_ADDR", "SET_TSS_ADDR", "SPLIT_IRQCHIP",
                                "TSC_DEADLINE_TIMER", "USER_MEMORY", "USER_NMI", "VCPU_EVENTS",
                                "XSAVE"),
                     "aarch64": ("IMMEDIATE_EXIT", "IOEVENTFD", "IRQCHIP", "IRQFD",
                                 "IRQ_ROUTING", "MP_STATE", "ONE_REG", "USER_MEMORY")},
        "optional": {"x86_64": ("XCRS", "X2APIC_API", "XSAVE2"), "aarch64": ("ARM_VM_IPA_SIZE",)},
        "ioctls": ("KVM_SET_IDENTITY_MAP_ADDR", "KVM_SET_TSS_ADDR", "KVM_ENABLE_CAP(SPLIT_IRQCHIP)"),
        "devices": {"networking": "/dev/net/tun"},
        "boot": "direct 64-bit",
    },
    # QEMU accel/kvm/kvm-all.c kvm_required_capabilites (9.x/10.x) and
    # target/i386/kvm/kvm.c kvm_arch_required_capabilities; IRQFD, PIT2 and
    # PIT_STATE2 with its default in-kernel irqchip and PIT.
    "qemu": {
        "required": {"x86_64": ("USER_MEMORY", "DESTROY_MEMORY_REGION_WORKS",
                                "JOIN_MEMORY_REGIONS_WORKS", "INTERNAL_ERROR_DATA", "IOEVENTFD",
                                "IOEVENTFD_ANY_LENGTH", "SET_TSS_ADDR", "EXT_CPUID", "MP_STATE",
                                "SIGNAL_MSI", "IRQ_ROUTING", "DEBUGREGS", "XSAVE", "VCPU_EVENTS",
                                "X86_ROBUST_SINGLESTEP", "MCE", "ADJUST_CLOCK",
                                "SET_IDENTITY_MAP_ADDR", "IRQFD", "PIT2", "PIT_STATE2"),
                     "aarch64": ("USER_MEMORY", "DESTROY_MEMORY_REGION_WORKS",
                                 "JOIN_MEMORY_REGIONS_WORKS", "INTERNAL_ERROR_DATA",
                                 "IOEVENTFD", "IOEVENTFD_ANY_LENGTH")},
        "optional": {"x86_64": ("XSAVE2",)},
        "ioctls": ("KVM_SET_IDENTITY_MAP_ADDR", "KVM_SET_TSS_ADDR", "KVM_CREATE_IRQCHIP",
                   "KVM_CREATE_PIT2"),
        "devices": {"networking": "/dev/net/tun", "vhost-net": "/dev/vhost-net",
                    "vhost-vsock (Kata)": "/dev/vhost-vsock"},
        "boot": "firmware (real mode)",
    },
    # crosvm src/crosvm/sys/linux.rs ("missing required hypervisor
    # capability ImmediateExit"); hypervisor/src/kvm/mod.rs.
    "crosvm": {
        "required": {"x86_64": ("IMMEDIATE_EXIT",), "aarch64": ("IMMEDIATE_EXIT",)},
        "optional": {"x86_64": ("XCRS", "TSC_DEADLINE_TIMER")},
        "ioctls": ("KVM_SET_IDENTITY_MAP_ADDR", "KVM_SET_TSS_ADDR", "KVM_CREATE_PIT2"),
        "devices": {"networking": "/dev/net/tun"},
        "boot": "direct 64-bit",
    },
}  # fmt: skip
#: The engines whose start-up the gate can check.  None is the bare device check.
ENGINES = tuple(ENGINE_REQUIREMENTS)

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

# CPUID bits the long-mode guest tests for (leaf 1 ECX; leaf 7 EDX).
_CPUID1_ECX_CX16 = 1 << 13
_CPUID1_ECX_XSAVE = 1 << 26
_CPUID7_EDX_ARCH_CAPABILITIES = 1 << 29
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
# within the noise of KVM_RUN's entry and exit.
_SPEED_SHORT = 1024
_SPEED_LONG = 1 << 17
_SPEED_SLOW_NS = 200_000  # loop time that already measures well

#: The longest bound on one KVM_RUN that ``timeout`` accepts, in seconds.
MAX_TIMEOUT = 3600.0

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
BOUND_NAMES = {0: None, BOUND_TIMER: "timer", BOUND_WATCHDOG: "watchdog thread",
               BOUND_NONE: "none"}  # fmt: skip
_STASH = 8  # foreign signals of our number set aside during one run
_EINTR_RETRIES = 1000

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

_WSL_INTEROP = "/proc/sys/fs/binfmt_misc/WSLInterop"


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

    def __init__(
        self,
        detail: str = "",
        *,
        cause: str = "",
        evidence: dict[str, object] | None = None,
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

    prefix = "engine reported an error: "
    code = "engine_unavailable"


class ConfigError(BoxliteError):
    """BoxLite's Config variant."""

    prefix = "configuration error: "
    code = "config_error"


class StorageError(BoxliteError):
    """BoxLite's Storage variant."""

    prefix = "storage error: "
    code = "storage_error"


class ImageError(BoxliteError):
    """BoxLite's Image variant."""

    prefix = "images error: "
    code = "image_pull_failed"


class PortalError(BoxliteError):
    """BoxLite's Portal variant."""

    prefix = "portal error: "


class NetworkError(BoxliteError):
    """BoxLite's Network variant."""

    prefix = "network error: "
    code = "network_unavailable"


class RpcError(BoxliteError):
    """BoxLite's Rpc variant."""

    prefix = "gRPC/tonic error: "


class RpcTransportError(BoxliteError):
    """BoxLite's RpcTransport variant."""

    prefix = "gRPC transport error: "


class InternalError(BoxliteError):
    """BoxLite's Internal variant: the checker itself failed."""

    prefix = "internal error: "
    code = "internal"


class ExecutionError(BoxliteError):
    """BoxLite's Execution variant."""

    prefix = "Execution error: "
    code = "execution_failed"


class UnsupportedError(BoxliteError):
    """BoxLite's Unsupported variant: this host cannot run BoxLite's VMs."""

    prefix = "unsupported: "
    code = "unsupported"


class NotFoundError(BoxliteError):
    """BoxLite's NotFound variant."""

    prefix = "box not found: "
    code = "not_found"


class AlreadyExistsError(BoxliteError):
    """BoxLite's AlreadyExists variant."""

    prefix = "already exists: "
    code = "already_exists"


class InvalidStateError(BoxliteError):
    """BoxLite's InvalidState variant."""

    prefix = "invalid state: "
    code = "invalid_state"


class DatabaseError(BoxliteError):
    """BoxLite's Database variant."""

    prefix = "database error: "
    code = "database_error"


class MetadataError(BoxliteError):
    """BoxLite's MetadataError variant."""

    prefix = "metadata error: "
    code = "metadata_error"


class InvalidArgumentError(BoxliteError):
    """BoxLite's InvalidArgument variant."""

    prefix = "invalid argument: "
    code = "invalid_argument"


class StoppedError(BoxliteError):
    """BoxLite's Stopped variant."""

    prefix = "stopped: "
    code = "stopped"


class ResourceExhaustedError(BoxliteError):
    """BoxLite's ResourceExhausted variant: a limit, not a missing feature."""

    prefix = "resource exhausted: "
    code = "resource_exhausted"


# ── Small helpers ───────────────────────────────────────────────────────────


def _log(level: str, message: str, *args: object) -> None:
    """Log on the "boxlite_syscheck" logger, importing logging only now."""
    import logging  # costs milliseconds; only error paths log

    getattr(logging.getLogger("boxlite_syscheck"), level)(message, *args)


def errno_name(number: int) -> str:
    """Return "ENAME (text)" for an errno, or the number if it has no name."""
    name = errno.errorcode.get(number, f"errno {number}")
    return f"{name} ({os.strerror(number)})"


def exit_name(reason: int) -> str:
    """Return "KVM_EXIT_NAME (n)" for an exit reason."""
    return f"KVM_EXIT_{EXIT_REASONS.get(reason, 'UNLISTED')} ({reason})"


# ── OS seams: every operating-system access goes through these ─────────────


def _open_device(path: str) -> int:
    """Open a device read-write and close-on-exec; raise OSError."""
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


def _stat(path: str) -> os.stat_result:
    """Stat a path as open() would see it; raise OSError."""
    return os.stat(path)


def _read_text(path: str) -> str | None:
    """Return a small text file's content, or None when it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(65536)
    except OSError:
        return None


def _exists(path: str) -> bool:
    """Return whether a path exists (used for marker files only)."""
    return os.path.exists(path)


def _load_library(path: str) -> ctypes.CDLL:
    """Load a shared library by absolute path; raise OSError."""
    import ctypes

    if not os.path.isabs(path):
        raise OSError(errno.EINVAL, "native code is loaded by absolute path only", path)
    return ctypes.CDLL(path, use_errno=True)


def _libc() -> ctypes.CDLL:
    """Return the C library already in this process (dlopen(NULL), no search)."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _sysctl_int(name: str) -> int | None:
    """Read an integer sysctl on macOS; None when it does not exist."""
    import ctypes

    libc = _cached("libsystem", lambda: _load_library(_LIBSYSTEM_PATH))
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
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return None
        raise OSError(err, os.strerror(err), name)
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
            return bool(cf.CFGetTypeID(value) == cf.CFBooleanGetTypeID()
                        and cf.CFBooleanGetValue(value))  # fmt: skip
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


def _reset_caches() -> None:
    """Forget loaded libraries and cached lookups (for tests)."""
    _CACHE.clear()


# ── Kernel structures (ctypes, defined on first use) ────────────────────────

_MAX_CPUID_ENTRIES = 256  # more than any KVM reports today (E2BIG otherwise)
_MAX_MSR_INDICES = 1024


class _Abi:
    """ctypes mirrors of the kernel and libkvmsmoke structures.

    Built on first use so that importing this module does not import ctypes.
    """

    def __init__(self) -> None:
        import ctypes

        u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
        i32, i64 = ctypes.c_int32, ctypes.c_int64

        class KvmRegs(ctypes.Structure):
            # arch/x86/include/uapi/asm/kvm.h struct kvm_regs
            _fields_ = [
                (name, u64)
                for name in (
                    "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 "
                    "rip rflags"
                ).split()
            ]

        class KvmSegment(ctypes.Structure):
            # arch/x86/include/uapi/asm/kvm.h struct kvm_segment
            _fields_ = [("base", u64), ("limit", u32), ("selector", u16)] + [
                (name, u8)
                for name in "type present dpl db s l g avl unusable padding".split()
            ]

        class KvmDtable(ctypes.Structure):
            _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]

        class KvmSregs(ctypes.Structure):
            _fields_ = (
                [(name, KvmSegment) for name in "cs ds es fs gs ss tr ldt".split()]
                + [("gdt", KvmDtable), ("idt", KvmDtable)]
                + [(name, u64) for name in "cr0 cr2 cr3 cr4 cr8 efer apic_base".split()]
                + [("interrupt_bitmap", u64 * 4)]
            )

        class KvmUserspaceMemoryRegion(ctypes.Structure):
            _fields_ = [
                ("slot", u32),
                ("flags", u32),
                ("guest_phys_addr", u64),
                ("memory_size", u64),
                ("userspace_addr", u64),
            ]

        class KvmCpuidEntry2(ctypes.Structure):
            _fields_ = [(name, u32) for name in "function index flags eax ebx ecx edx".split()] + [
                ("padding", u32 * 3)
            ]

        class KvmCpuid2(ctypes.Structure):
            _fields_ = [("nent", u32), ("padding", u32),
                        ("entries", KvmCpuidEntry2 * _MAX_CPUID_ENTRIES)]  # fmt: skip

        class KvmMsrList(ctypes.Structure):
            _fields_ = [("nmsrs", u32), ("indices", u32 * _MAX_MSR_INDICES)]

        class KvmMsrEntry(ctypes.Structure):
            _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]

        class KvmMsrs(ctypes.Structure):
            _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * len(BOOT_MSRS))]

        class SigEvent(ctypes.Structure):
            # include/uapi/asm-generic/siginfo.h struct sigevent, 64 bytes,
            # with the SIGEV_THREAD_ID member of its union.
            _fields_ = [
                ("sigev_value", ctypes.c_void_p),
                ("sigev_signo", ctypes.c_int),
                ("sigev_notify", ctypes.c_int),
                ("tid", ctypes.c_int),
                ("pad", ctypes.c_int * 11),
            ]

        class SigInfo(ctypes.Structure):
            # siginfo_t, 128 bytes: the fields read here sit at the same
            # offsets for SI_TIMER (_timer) and SI_USER/SI_QUEUE (_rt).
            _fields_ = [("si_signo", ctypes.c_int), ("si_errno", ctypes.c_int),
                        ("si_code", ctypes.c_int), ("pad0", ctypes.c_int),
                        ("si_pid", ctypes.c_int), ("si_uid", ctypes.c_uint),
                        ("si_value", ctypes.c_void_p),
                        ("rest", ctypes.c_uint8 * (128 - 16 - 8 - ctypes.sizeof(ctypes.c_void_p)))]  # fmt: skip

        class SigSet(ctypes.Structure):
            _fields_ = [("bits", ctypes.c_ulong * (128 // ctypes.sizeof(ctypes.c_ulong)))]

        class Timespec(ctypes.Structure):
            _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

        class Itimerspec(ctypes.Structure):
            _fields_ = [("it_interval", Timespec), ("it_value", Timespec)]

        class Op(ctypes.Structure):
            # struct kvmsmoke_op in kvm_smoke.c
            _fields_ = [(name, i32) for name in
                        "step kind fd fd_out value_out check flags pad".split()]  # fmt: skip
            _fields_ += [("check_value", i64)]
            _fields_ += [(name, u64) for name in "request arg src len".split()]

        class State(ctypes.Structure):
            # struct kvmsmoke_state
            _fields_ = [("fds", i32 * _FD_SLOTS), ("run_addr", u64), ("run_size", u64),
                        ("deadline_ns", u64)]  # fmt: skip

        class Outcome(ctypes.Structure):
            # struct kvmsmoke_result
            _fields_ = [(name, i32) for name in (
                "step error op_index timed_out runs interrupted bound bound_error "
                "requeued pad").split()]  # fmt: skip
            _fields_ += [("values", i64 * _VALUE_SLOTS), ("run_head", u8 * _RUN_HEAD)]

        self.KvmRegs = KvmRegs
        self.KvmSegment = KvmSegment
        self.KvmSregs = KvmSregs
        self.KvmUserspaceMemoryRegion = KvmUserspaceMemoryRegion
        self.KvmCpuid2 = KvmCpuid2
        self.KvmMsrList = KvmMsrList
        self.KvmMsrs = KvmMsrs
        self.SigEvent = SigEvent
        self.SigInfo = SigInfo
        self.SigSet = SigSet
        self.Timespec = Timespec
        self.Itimerspec = Itimerspec
        self.Op = Op
        self.State = State
        self.Outcome = Outcome


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
    bytes); ``arch`` is "x86_64" or "aarch64".
    ``sregs`` are the special-register fields set on top of KVM's reset
    state (segments as dicts of kvm_segment fields).  ``marks`` names the
    instruction at each code offset, so a stop is reported by instruction.
    """

    def __init__(self, name: str, image: bytes, mem_size: int, entry: int,
                 sregs: dict[str, Any], regs: dict[str, int],
                 marks: dict[int, str] | None = None, loop: int = -1,
                 cx16_area: int = -1, base: int = 0, arch: str = "x86_64") -> None:  # fmt: skip
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


def _aarch64_guest() -> _Guest:
    """The arm64 guest: one page at 0x10000, PC there, EL1 with interrupts
    masked (KVM_ARM_VCPU_INIT's reset state); it proves itself by MMIO."""
    image = b"".join(word.to_bytes(4, "little") for word in _ARM64_CODE)
    return _Guest("aarch64", image, 0x1000, _ARM64_BASE, {}, {}, base=_ARM64_BASE,
                  arch="aarch64")  # fmt: skip


def _real_mode_guest(code: bytes = _GUEST_HALT) -> _Guest:
    """Real-mode code at address 0: the bare device check's trivial guest."""
    return _Guest("real-mode", code, 0x1000, 0,
                  {"cs": {"base": 0, "selector": 0}}, {"rip": 0, "rflags": 0x2})  # fmt: skip


# Long-mode guest memory: the boot GDT where Firecracker puts it, identity
# page tables (PML4, PDPT, PD with one 2 MiB page), code, data, stack.
_LM_GDT, _LM_PML4, _LM_PDPT, _LM_PD = 0x500, 0x1000, 0x2000, 0x3000
_LM_CODE, _LM_DATA, _LM_XSAVE, _LM_STACK, _LM_SIZE = 0x4000, 0x5000, 0x5040, 0x7FF0, 0x8000

#: Stage numbers the long-mode guest writes to R15 before each tested
#: instruction; a stop anywhere else is reported by the last stage reached.
STAGES = {
    1: "cpuid",
    2: "lock cmpxchg16b",
    3: "mov cr4 (OSXSAVE)",
    4: "xsetbv",
    5: "xsave64",
    6: "xrstor64",
    7: "mov eax (proof value)",
}
_STAGE_FAILED = 8  # the guest saw a wrong result and halted without the proof


def _long_mode_program() -> tuple[bytes, dict[int, str], dict[str, int]]:
    """Assemble the long-mode guest; return (code, marks, labels).

    It runs what a stock Linux kernel runs early and an instruction emulator
    may lack: CPUID, then ``lock cmpxchg16b`` when CPUID offers CX16 (SLUB
    relies on it), then ``mov cr4``/``xsetbv``/``xsave64``/``xrstor64`` when
    CPUID offers XSAVE (the FPU set-up), then loads the proof value and
    halts.  The speed loop (``dec ecx; jnz``, RCX iterations) follows.
    """
    proof = PROOF_VALUE.to_bytes(4, "little")
    code = bytearray()
    marks: dict[int, str] = {}
    labels: dict[str, int] = {}
    fixups: list[tuple[int, str]] = []

    def put(raw: bytes, mark: str = "") -> None:
        if mark:
            marks[len(code)] = mark
        code.extend(raw)

    def stage(n: int) -> None:
        put(b"\x41\xbf" + n.to_bytes(4, "little"))  # mov r15d, n

    def jump(opcode: int, label: str) -> None:
        put(bytes([opcode, 0]))
        fixups.append((len(code) - 1, label))

    stage(1)
    put(b"\xb8\x01\x00\x00\x00")  # mov eax, 1
    put(b"\x31\xc9")  # xor ecx, ecx
    put(b"\x0f\xa2", "cpuid")
    put(b"\x41\x89\xc8")  # mov r8d, ecx: the leaf 1 feature bits
    put(b"\x41\x0f\xba\xe0\x0d")  # bt r8d, 13 (CX16)
    jump(0x73, "no_cx16")  # jnc
    stage(2)
    put(b"\xbf" + _LM_DATA.to_bytes(4, "little"))  # mov edi, data
    put(b"\x31\xc0\x31\xd2")  # xor eax, eax; xor edx, edx: expect 0
    put(b"\xbb" + proof + b"\xb9" + proof)  # mov ebx, proof; mov ecx, proof
    put(b"\xf0\x48\x0f\xc7\x0f", "lock cmpxchg16b")  # lock cmpxchg16b [rdi]
    jump(0x75, "failed")  # jnz: the compare must have matched
    labels["no_cx16"] = len(code)
    put(b"\x41\x0f\xba\xe0\x1a")  # bt r8d, 26 (XSAVE)
    jump(0x73, "no_xsave")
    stage(3)
    put(b"\x0f\x20\xe0")  # mov rax, cr4
    put(b"\x0d" + _CR4_OSXSAVE.to_bytes(4, "little"))  # or eax, OSXSAVE
    put(b"\x0f\x22\xe0", "mov cr4 (OSXSAVE)")  # mov cr4, rax
    stage(4)
    put(b"\x31\xc9\xb8\x03\x00\x00\x00\x31\xd2")  # ecx=0 (XCR0), edx:eax = 3 (x87|SSE)
    put(b"\x0f\x01\xd1", "xsetbv")
    stage(5)
    put(b"\xbf" + _LM_XSAVE.to_bytes(4, "little"))  # mov edi, xsave area
    put(b"\xb8\x03\x00\x00\x00\x31\xd2")  # edx:eax = 3: the components
    put(b"\x48\x0f\xae\x27", "xsave64")  # xsave64 [rdi]
    stage(6)
    put(b"\x48\x0f\xae\x2f", "xrstor64")  # xrstor64 [rdi]
    labels["no_xsave"] = len(code)
    stage(7)
    put(b"\xb8" + proof, "mov eax (proof value)")
    put(b"\xf4", "hlt")
    labels["failed"] = len(code)
    stage(_STAGE_FAILED)
    put(b"\x31\xc0")  # xor eax, eax: no proof
    put(b"\xf4", "hlt")
    labels["loop"] = len(code)
    put(_LOOP_BODY, "dec ecx; jnz (speed loop)")
    put(b"\xf4", "hlt")
    for at, label in fixups:
        offset = labels[label] - (at + 1)
        assert -128 <= offset < 128, label
        code[at] = offset & 0xFF
    return bytes(code), marks, labels


# The speed loop's body: "dec ecx; jnz .-2".  The guest runs it with RCX set;
# the host runs the same bytes as "mov ecx, edi; <body>; ret".
_LOOP_BODY = b"\xff\xc9\x75\xfc"
_HOST_LOOP = b"\x89\xf9" + _LOOP_BODY + b"\xc3"


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
    data = _segment(_BOOT_DS, gdt[_BOOT_DS // 8])
    sregs: dict[str, Any] = {
        "cs": _segment(_BOOT_CS, gdt[_BOOT_CS // 8]),
        **{name: data for name in ("ds", "es", "fs", "gs", "ss")},
        "gdt": {"base": _LM_GDT, "limit": 8 * len(gdt) - 1},
        "cr0": _CR0_LINUX,
        "cr3": _LM_PML4,
        "cr4": _CR4_PAE,
        "efer": _EFER_LME | _EFER_LMA,
    }
    guest = _Guest(
        "long-mode", bytes(image), _LM_SIZE, _LM_CODE, sregs,
        {"rip": _LM_CODE, "rsp": _LM_STACK, "rflags": 0x2},
        {_LM_CODE + k: v for k, v in marks.items()}, _LM_CODE + labels["loop"], _LM_DATA,
    )  # fmt: skip
    return guest


# ── The operations both backends execute ────────────────────────────────────

# Operation kinds, result checks and flags (kvm_smoke.c has the same numbers).
_OP_IOCTL, _OP_COPY, _OP_MAP_RUN, _OP_RUN = 1, 2, 3, 4
_CHECK_NONE, _CHECK_EQ, _CHECK_GE = 0, 1, 2
_OPF_SOFT = 1  # a failure stores -errno in the value slot and goes on
_FD_SLOTS, _VALUE_SLOTS = 4, 16
_KVM, _VM, _VCPU = 0, 1, 2  # descriptor slots
# Value slots.
(_V_API, _V_RUN_SIZE, _V_CPUID, _V_BOOT_MSRS, _V_MSR_LIST, _V_FEATURE_LIST, _V_ARCH_GET,
 _V_ARCH_SET, _V_T_WARM, _V_T_BASE, _V_T_SHORT, _V_T_LONG, _V_T_GUEST, _V_T_BASE2,
 _V_T_LONG2) = range(15)  # fmt: skip


class _Plan:
    """An array of operations under construction, with the buffers they use."""

    def __init__(self) -> None:
        self.ops: list[tuple[int, ...]] = []

    # Each op is a tuple in struct kvmsmoke_op's field order: step, kind, fd,
    # fd_out, value_out, check, flags, pad, check_value, request, arg, src, len.

    def ioctl(self, step: int, fd: int, request: int, arg: int = 0, *, fd_out: int = -1,
              value: int = -1, check: int = _CHECK_NONE, expect: int = 0,
              soft: bool = False) -> None:  # fmt: skip
        self.ops.append((step, _OP_IOCTL, fd, fd_out, value, check,
                         _OPF_SOFT if soft else 0, 0, expect, request, arg, 0, 0))  # fmt: skip

    def copy(self, step: int, dest: int, src: int, size: int) -> None:
        self.ops.append((step, _OP_COPY, 0, -1, -1, 0, 0, 0, 0, 0, dest, src, size))

    def map_run(self, step: int) -> None:
        self.ops.append((step, _OP_MAP_RUN, _VCPU, -1, -1, 0, 0, 0, 0, 0, 0, _V_RUN_SIZE, 0))

    def run(self, timeout_ns: int, signo: int, value: int, cookie: int) -> None:
        # check_value carries the step reported when arming the bound fails.
        self.ops.append((STEP_RUN, _OP_RUN, _VCPU, -1, value, 0, 0, 0, STEP_ARM_TIMER,
                         timeout_ns, signo, cookie, 0))  # fmt: skip

    def build(self) -> tuple[Any, int]:
        """The operations as a struct kvmsmoke_op array, and their count."""
        import struct

        count = len(self.ops)
        pack = struct.Struct("=8iq4Q").pack  # struct kvmsmoke_op, 64 bytes
        raw = b"".join([pack(*op) for op in self.ops]) or bytes(64)
        return (_abi().Op * max(1, count)).from_buffer_copy(raw), count


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
        import time

        start = 0
        size = ctypes.sizeof(_abi().Op)
        while True:
            self.lib.kvmsmoke_exec(ctypes.byref(ops, start * size), count - start,
                                   ctypes.byref(state), ctypes.byref(out))  # fmt: skip
            out.op_index += start
            if not out.interrupted:
                return
            if state.deadline_ns and time.monotonic_ns() >= state.deadline_ns:
                # KVM_RUN keeps answering EINTR with no signal of ours (a
                # policy, say): the bound has passed all the same.
                out.timed_out, out.error, out.interrupted = 1, 0, 0
                state.deadline_ns = 0
                return
            start = out.op_index

    def release(self, state: Any) -> None:
        import ctypes

        self.lib.kvmsmoke_release(ctypes.byref(state))


class _PythonBackend:
    """Runs the same operations from Python through the C library's calls."""

    name = "python"

    def execute(self, ops: Any, count: int, state: Any, out: Any) -> None:
        out.step, out.error, out.timed_out = -1, 0, 0
        for index in range(count):
            out.op_index = index
            op = ops[index]
            try:
                self._one(op, state, out)
            except _StepFailed as failed:
                out.step, out.error = failed.step, failed.error
                return

    def _one(self, op: Any, state: Any, out: Any) -> None:
        import ctypes

        libc = _sys_libc()
        if op.kind == _OP_IOCTL:
            try:
                ret = _ioctl(state.fds[op.fd], op.request, op.arg)
            except _SysError as err:
                if op.flags & _OPF_SOFT:
                    if op.value_out >= 0:
                        out.values[op.value_out] = -(err.errno or 0)
                    return
                raise _StepFailed(op.step, err.errno or 0) from err
            if op.value_out >= 0:
                out.values[op.value_out] = ret
            if op.fd_out >= 0:
                state.fds[op.fd_out] = ret  # KVM sets O_CLOEXEC on its descriptors
            if op.check == _CHECK_EQ and ret != op.check_value:
                raise _StepFailed(op.step, 0)
            if op.check == _CHECK_GE and ret < op.check_value:
                raise _StepFailed(op.step, errno.EPROTO)
        elif op.kind == _OP_COPY:
            ctypes.memmove(op.arg, op.src, op.len)
        elif op.kind == _OP_MAP_RUN:
            size = out.values[op.src]
            addr = libc.mmap(None, size, 0x3, 0x01, state.fds[op.fd], 0)  # RW, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                raise _StepFailed(op.step, ctypes.get_errno())
            state.run_addr, state.run_size = addr, size
        elif op.kind == _OP_RUN:
            if not state.run_addr:
                raise _StepFailed(op.step, errno.EFAULT)
            failed: _StepFailed | None = None
            try:
                elapsed = _python_run(state.fds[op.fd], state, op, out)
            except _StepFailed as err:
                failed, elapsed = err, 0
            ctypes.memmove(out.run_head, state.run_addr, min(state.run_size, _RUN_HEAD))
            if op.value_out >= 0:
                out.values[op.value_out] += elapsed
            if failed is not None:
                raise failed
            if out.timed_out:
                raise _StepFailed(op.step, 0)
        else:
            raise _StepFailed(op.step, errno.EINVAL)

    def release(self, state: Any) -> None:
        if state.run_addr:
            _sys_libc().munmap(state.run_addr, state.run_size)
            state.run_addr = state.run_size = 0
        for slot in range(_FD_SLOTS - 1, 0, -1):
            if state.fds[slot] >= 0:
                os.close(state.fds[slot])
                state.fds[slot] = -1


class _StepFailed(Exception):
    def __init__(self, step: int, error: int) -> None:
        super().__init__(step, error)
        self.step = step
        self.error = error


def _sys_libc() -> ctypes.CDLL:
    """The C library with the calls the Python backend makes, declared."""
    import ctypes

    def load() -> ctypes.CDLL:
        libc = _libc()
        libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
        libc.ioctl.restype = ctypes.c_int
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]  # fmt: skip
        libc.mmap.restype = ctypes.c_void_p
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.munmap.restype = ctypes.c_int
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mprotect.restype = ctypes.c_int
        # long syscall(long number, ...); the rest are passed as typed values.
        libc.syscall.argtypes = [ctypes.c_long]
        libc.syscall.restype = ctypes.c_long
        libc.sigemptyset.argtypes = [ctypes.c_void_p]
        libc.sigemptyset.restype = ctypes.c_int
        libc.sigaddset.argtypes = [ctypes.c_void_p, ctypes.c_int]
        libc.sigaddset.restype = ctypes.c_int
        libc.sigtimedwait.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        libc.sigtimedwait.restype = ctypes.c_int
        return libc

    libc: ctypes.CDLL = _cached("libc", load)
    return libc


class _SysError(OSError):
    """An error a system call of ours returned (never one a caller raised)."""


def _ioctl(fd: int, request: int, arg: int = 0, *, retry: bool = True) -> int:
    """ioctl(2) through the C library; raise _SysError.

    EINTR is retried a bounded number of times (a policy that answers EINTR
    forever must not hang the check), or not at all when ``retry`` is false.
    """
    import ctypes

    libc = _sys_libc()
    for _ in range(_EINTR_RETRIES if retry else 1):
        ret = int(libc.ioctl(fd, request, arg))
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != errno.EINTR:
            break
    raise _SysError(err, os.strerror(err))


def _cookie() -> int:
    """A value no one else puts in our timer signal's si_value: a random
    per-process base and a counter (thread-safe: next() on a count is atomic)."""

    def make() -> Any:
        import itertools

        return itertools.count(int.from_bytes(os.urandom(6), "little") << 16)

    cookie: int = next(_cached("cookie", make)) & 0x7FFFFFFFFFFFFFFF
    return cookie


def _timer_signal() -> int:
    """The real-time signal that bounds KVM_RUN (blocked outside KVM_RUN)."""
    import signal

    return int(signal.SIGRTMAX) - 1


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
        self.thread = threading.Thread(target=self._watch, name="boxlite-syscheck-watchdog",
                                       daemon=True)  # fmt: skip
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
    import ctypes

    bits = sum(1 << (int(s) - 1) for s in saved if int(s) not in unblocked)
    kmask = (ctypes.c_uint8 * 12).from_buffer_copy(
        (8).to_bytes(4, "little") + bits.to_bytes(8, "little"))  # fmt: skip
    _at(arm_step, _ioctl, vcpu, KVM_SET_SIGNAL_MASK, ctypes.addressof(kmask))


def _take_pending(signo: int, cookie: int, stash: list[Any]) -> bool:
    """Take pending instances of our (blocked) signal: ours end the run,
    anyone else's are set aside to be queued again.  True when ours came."""
    import ctypes

    abi, libc = _abi(), _sys_libc()
    only = abi.SigSet()
    libc.sigemptyset(ctypes.byref(only))
    libc.sigaddset(ctypes.byref(only), signo)
    zero = abi.Timespec(0, 0)
    mine = False
    while True:
        info = abi.SigInfo()
        if libc.sigtimedwait(ctypes.byref(only), ctypes.byref(info), ctypes.byref(zero)) != signo:
            return mine
        if (info.si_value or 0) == cookie and info.si_code in (_SI_TIMER, _SI_USER):
            mine = True
        elif len(stash) < _STASH:
            stash.append(info)


def _python_run(vcpu: int, state: Any, op: Any, out: Any) -> int:
    """KVM_RUN bounded as kvm_smoke.c bounds it; return the nanoseconds it took.

    A handler that raises (KeyboardInterrupt, say) propagates from here
    with the signal state restored; the deadline stays in ``state`` so a
    resumed run keeps its bound.
    """
    import ctypes
    import signal
    import threading
    import time

    libc = _sys_libc()
    signo, cookie, arm_step = int(op.arg), int(op.src), int(op.check_value)
    if not state.deadline_ns:
        state.deadline_ns = time.monotonic_ns() + int(op.request)
    saved = _at(arm_step, signal.pthread_sigmask, signal.SIG_BLOCK, {signo})
    stash: list[Any] = []
    timer = watchdog = None
    theirs_classic = finished = False
    try:
        _take_pending(signo, cookie, stash)  # someone else's, already pending
        _kvm_mask(vcpu, saved, {signo}, arm_step)
        try:
            timer = _timer_start(libc, signo, threading.get_native_id(), state.deadline_ns,
                                 cookie)  # fmt: skip
            out.bound = BOUND_TIMER
        except _SysError as err:
            out.bound_error = err.errno or 0
            classic = _watchdog_signal()
            signal.pthread_sigmask(signal.SIG_BLOCK, {classic})
            theirs_classic = _take_watchdog(None)[1]
            _kvm_mask(vcpu, saved, {signo, classic}, arm_step)
            try:
                watchdog = _Watchdog(threading.get_ident(), state.deadline_ns)
                out.bound = BOUND_WATCHDOG
            except RuntimeError:
                out.bound = BOUND_NONE  # the result still counts, unbounded
        start = time.perf_counter_ns()
        while True:
            out.runs += 1
            try:
                _ioctl(vcpu, KVM_RUN, 0, retry=False)
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
        return time.perf_counter_ns() - start
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
            if libc.syscall(number, ctypes.c_int(os.getpid()),
                            ctypes.c_int(threading.get_native_id()), ctypes.c_int(signo),
                            ctypes.byref(info)) == 0:  # fmt: skip
                out.requeued += 1
        if theirs_classic:
            signal.pthread_kill(threading.get_ident(), _watchdog_signal())
        if finished:
            state.deadline_ns = 0


def _at(step: int, call: Callable[..., Any], *args: Any) -> Any:
    """Run one step; turn the OS's error into _StepFailed.

    Only errors with an errno are the OS's: an exception a signal handler
    raises (a TimeoutError of the caller's, say) propagates unchanged.
    """
    try:
        return call(*args)
    except OSError as err:
        if err.errno is None:
            raise
        raise _StepFailed(step, err.errno) from err


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
    event = abi.SigEvent(sigev_value=cookie, sigev_signo=signo,
                         sigev_notify=_SIGEV_THREAD_ID, tid=tid)  # fmt: skip
    timer_id = ctypes.c_int(-1)
    if libc.syscall(create, ctypes.c_int(_CLOCK_MONOTONIC), ctypes.byref(event),
                    ctypes.byref(timer_id)) < 0:  # fmt: skip
        err = ctypes.get_errno()
        raise _SysError(err, os.strerror(err))
    when = abi.Itimerspec()
    when.it_value.tv_sec, when.it_value.tv_nsec = divmod(max(1, deadline_ns), 1_000_000_000)
    if libc.syscall(settime, ctypes.c_int(timer_id.value), ctypes.c_int(_TIMER_ABSTIME),
                    ctypes.byref(when), None) < 0:  # fmt: skip
        err = ctypes.get_errno()
        _timer_delete(libc, timer_id.value)
        raise _SysError(err, os.strerror(err))
    return timer_id.value


def _timer_delete(libc: ctypes.CDLL, timer: int) -> None:
    import ctypes

    if libc.syscall(_syscall_numbers()[2], ctypes.c_int(timer)) < 0:
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
        _log("warning", "%s=%r is not an absolute path; using the Python backend",
             LIBRARY_ENV, path)  # fmt: skip
        return None, f"{path!r} is not an absolute path"
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
    execute.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p]
    execute.restype = ctypes.c_int
    release.argtypes = [ctypes.c_void_p]
    release.restype = None
    found = abi_version()
    if found != _NATIVE_ABI_VERSION:
        _log("warning", "%s has ABI version %d, expected %d; using the Python backend",
             path, found, _NATIVE_ABI_VERSION)  # fmt: skip
        return None, f"{path} has ABI version {found}, expected {_NATIVE_ABI_VERSION}"
    expected = [ctypes.sizeof(t) for t in (abi.Op, abi.State, abi.Outcome)]
    if [sizes(i) for i in range(3)] != expected:
        _log("warning", "%s structure sizes differ; using the Python backend", path)
        return None, f"{path} reports a different structure layout"
    return lib, path


def native_backend() -> tuple[bool, str]:
    """Return (whether libkvmsmoke.so is usable, its path or why not)."""
    lib, note = _cached("native", _load_native)
    return lib is not None, note


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

    __slots__ = (
        "api_version", "backend", "cpuid", "cx16_value", "elapsed", "error", "exit_reason",
        "fail_entry_cpu", "guest", "hardware_entry_failure_reason", "insn_bytes",
        "instruction", "internal_data", "internal_suberror", "msrs", "proof", "rip", "runs",
        "speed", "stage", "step", "timed_out", "timeout", "bound", "requeued", "mmio",
    )  # fmt: skip

    def __init__(self, backend: str, timeout: float = DEFAULT_TIMEOUT,
                 guest: str = "real-mode") -> None:  # fmt: skip
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
        #: Leaf 1/7 features the supported CPUID offers (long mode only).
        self.cpuid: dict[str, bool] = {}
        self.cx16_value = 0
        self.speed: Speed | None = None
        self.msrs: dict[str, object] = {}
        #: How KVM_RUN was bounded: "timer", "watchdog thread" or "none".
        self.bound: str | None = None
        #: Signals of the timer's number raised by others, queued again.
        self.requeued = 0
        #: The arm64 guest's MMIO exit: phys_addr, data, len, is_write.
        self.mmio: dict[str, object] = {}

    @property
    def ok(self) -> bool:
        """True when the guest ran the expected code and halted with the proof."""
        if self.guest == "aarch64":
            return (self.step == STEP_DONE and self.exit_reason == KVM_EXIT_MMIO
                    and self.mmio == {"phys_addr": _ARM64_MMIO, "data": PROOF_VALUE,
                                      "len": 4, "is_write": True}
                    and self.proof == PROOF_VALUE)  # fmt: skip
        passed = (
            self.step == STEP_DONE
            and self.exit_reason == KVM_EXIT_HLT
            and self.proof == PROOF_VALUE
        )
        if self.guest == "long-mode":
            swapped = PROOF_VALUE | PROOF_VALUE << 64
            passed = passed and self.stage == 7 and (
                not self.cpuid.get("cx16") or self.cx16_value == swapped)  # fmt: skip
        return passed

    @property
    def emulated(self) -> bool | None:
        """Whether guest code runs emulated in software (None: not measured)."""
        return None if self.speed is None else self.speed.emulated

    @property
    def step_name(self) -> str:
        return STEP_NAMES[self.step] if 0 <= self.step < len(STEP_NAMES) else str(self.step)

    def outcome(self) -> tuple[object, ...]:
        """The fields that must agree between backends (not timing, not backend)."""
        return (
            self.guest, self.step, self.error, self.api_version, self.exit_reason,
            self.proof, self.stage, self.instruction, self.hardware_entry_failure_reason,
            self.fail_entry_cpu, self.internal_suberror, self.insn_bytes.hex(), self.timed_out,
            tuple(sorted(self.cpuid.items())), self.cx16_value,
            tuple(sorted((k, str(v)) for k, v in self.msrs.items())),
            tuple(sorted(self.mmio.items())),
            None if self.speed is None else self.speed.emulated,
        )  # fmt: skip

    def as_dict(self) -> dict[str, object]:
        """Return the result as plain JSON-ready values, with names."""
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
            "internal_suberror": self.internal_suberror,
            "internal_suberror_name": INTERNAL_SUBERRORS.get(self.internal_suberror)
            if self.internal_suberror else None,
            "insn_bytes": self.insn_bytes.hex(" ") or None,
            "timed_out": self.timed_out,
            "timeout_s": self.timeout,
            "bound": self.bound,
            "runs": self.runs,
            "elapsed_s": round(self.elapsed, 6),
            "cpuid": self.cpuid or None,
            "speed": self.speed.as_dict() if self.speed is not None else None,
            "msrs": self.msrs or None,
            "mmio": {k: hex(v) if isinstance(v, int) and not isinstance(v, bool) else v
                     for k, v in self.mmio.items()} or None,
        }  # fmt: skip

    def __repr__(self) -> str:
        if self.ok:
            return (
                f"<SmokeResult {self.guest} guest ran and halted, proof {self.proof:#x}, "
                f"{self.elapsed * 1e3:.2f} ms, {self.backend} backend>"
            )
        what = errno_name(self.error) if self.error else "no errno"
        if self.exit_reason >= 0:
            what = exit_name(self.exit_reason)
            if self.instruction:
                what += f" at {self.instruction}"
        if self.timed_out:
            what = f"timed out after {self.timeout:g} s"
        return (f"<SmokeResult {self.guest} guest failed at {self.step_name!r}: {what}, "
                f"{self.backend} backend>")  # fmt: skip


class Speed:
    """The guest loop's speed against the same loop on the host CPU."""

    __slots__ = ("guest_ns", "host_ns", "iterations", "note")

    def __init__(self, guest_ns: float, host_ns: float | None, iterations: int,
                 note: str = "") -> None:  # fmt: skip
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
            text += f", about {_times(self.ratio)} times the same loop on the host CPU"
        else:
            text += f" (host not measured: {self.note})"
        return text

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
    return f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.2g}"


def _ns(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _host_loop() -> Callable[[int], None]:
    """The speed loop's bytes as a host function (a page mapped RW, then RX)."""
    import ctypes

    def load() -> Callable[[int], None]:
        libc = _sys_libc()
        page = os.sysconf("SC_PAGE_SIZE")
        addr = libc.mmap(None, page, 0x3, 0x22, -1, 0)  # RW, MAP_PRIVATE|MAP_ANONYMOUS
        if addr in (None, ctypes.c_void_p(-1).value):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), "mmap")
        ctypes.memmove(addr, _HOST_LOOP, len(_HOST_LOOP))
        if libc.mprotect(addr, page, 0x5) != 0:  # never writable and executable at once
            err = ctypes.get_errno()
            libc.munmap(addr, page)
            raise OSError(err, os.strerror(err), "mprotect")
        function: Callable[[int], None] = ctypes.CFUNCTYPE(None, ctypes.c_uint32)(addr)
        return function

    loop: Callable[[int], None] = _cached("host_loop", load)
    return loop


def _host_ns_per_iteration(iterations: int) -> tuple[float | None, str]:
    """Time the speed loop on the host CPU: (ns per iteration or None, why not)."""
    import time

    try:
        loop = _host_loop()
    except OSError as err:
        return None, f"cannot map the host loop executable: {errno_name(err.errno or 0)}"
    best = None
    for _ in range(2):
        start = time.perf_counter_ns()
        loop(iterations)
        took = time.perf_counter_ns() - start
        best = took if best is None else min(best, took)
    assert best is not None
    return best / iterations, ""


def _decode_run(result: SmokeResult, head: bytes) -> None:
    """Fill the exit fields from the copied head of struct kvm_run."""

    def u(offset: int, size: int) -> int:
        return int.from_bytes(head[offset : offset + size], "little")

    result.exit_reason = u(_RUN_EXIT_REASON, 4)
    if result.exit_reason == KVM_EXIT_FAIL_ENTRY:
        result.hardware_entry_failure_reason = u(_RUN_FAIL_ENTRY_REASON, 8)
        result.fail_entry_cpu = u(_RUN_FAIL_ENTRY_CPU, 4)
    elif result.exit_reason == KVM_EXIT_INTERNAL_ERROR:
        result.internal_suberror = u(_RUN_INTERNAL_SUBERROR, 4)
        ndata = min(u(_RUN_INTERNAL_NDATA, 4), 16)
        result.internal_data = tuple(u(_RUN_INTERNAL_DATA + 8 * i, 8) for i in range(ndata))
        flags = u(_RUN_INTERNAL_DATA, 8) if ndata else 0
        if result.internal_suberror == 1 and ndata >= 3 and flags & _EMULATION_FLAG_INSTRUCTION_BYTES:
            size = min(u(_RUN_EMULATION_INSN_SIZE, 1), 15)
            result.insn_bytes = bytes(head[_RUN_EMULATION_INSN_BYTES : _RUN_EMULATION_INSN_BYTES + size])


class _Session:
    """One throwaway VM: guest memory, the buffers the operations point into."""

    def __init__(self, fd: int, guest: _Guest, backend: Any, result: SmokeResult,
                 timeout_ns: int) -> None:  # fmt: skip
        import ctypes
        import mmap

        abi = _abi()
        self.guest, self.backend, self.result = guest, backend, result
        self.timeout_ns = timeout_ns
        self.signo = _timer_signal()
        self.state = abi.State()
        self.state.fds[:] = [fd, -1, -1, -1]
        self.out = abi.Outcome()
        self.mem = _at(STEP_GUEST_MEMORY, mmap.mmap, -1, guest.mem_size,
                       mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.mem[: len(guest.image)] = guest.image
        anchor = ctypes.c_char.from_buffer(self.mem)
        self.mem_addr = ctypes.addressof(anchor)
        del anchor  # the mapping stays; the export must go before close()
        self.region = abi.KvmUserspaceMemoryRegion(
            slot=0, flags=0, guest_phys_addr=guest.base, memory_size=guest.mem_size,
            userspace_addr=self.mem_addr)  # fmt: skip
        if guest.arch == "aarch64":
            import ctypes

            # struct kvm_vcpu_init: KVM_ARM_PREFERRED_TARGET fills it and
            # KVM_ARM_VCPU_INIT reads it unchanged.  struct kvm_one_reg: id, addr.
            self.vcpu_init = (ctypes.c_uint8 * 32)()
            self.pc = ctypes.c_uint64(guest.entry)
            self.x0 = ctypes.c_uint64(0)
            self.set_pc = (ctypes.c_uint64 * 2)(ARM64_REG_PC, ctypes.addressof(self.pc))
            self.get_x0 = (ctypes.c_uint64 * 2)(ARM64_REG_X0, ctypes.addressof(self.x0))
        # Every buffer whose address goes into an operation is held here
        # until the session closes.
        self.sregs = abi.KvmSregs()
        self.wanted, self.spans = guest.wanted()
        self.regs = abi.KvmRegs()  # what KVM_GET_REGS reads back
        self.blocks: list[Any] = []  # what each KVM_SET_REGS writes
        if guest.long_mode:
            self.cpuid = abi.KvmCpuid2(nent=_MAX_CPUID_ENTRIES)
            self.msr_list = abi.KvmMsrList(nmsrs=_MAX_MSR_INDICES)
            self.feature_list = abi.KvmMsrList(nmsrs=_MAX_MSR_INDICES)
            self.boot_msrs = abi.KvmMsrs(nmsrs=len(BOOT_MSRS))
            for entry, (_, index, value) in zip(self.boot_msrs.entries, BOOT_MSRS):
                entry.index, entry.data = index, value
            self.arch_msrs = abi.KvmMsrs(nmsrs=1)
            self.arch_msrs.entries[0].index = MSR_IA32_ARCH_CAPABILITIES

    def addr(self, obj: Any) -> int:
        import ctypes

        return ctypes.addressof(obj)

    def execute(self, plan: _Plan) -> bool:
        """Run a plan; record a failure in the result; return whether all ran."""
        ops, count = plan.build()
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

    def close(self) -> None:
        self.backend.release(self.state)
        self.mem.close()

    def run_plan(self, plan: _Plan, rip: int, value: int, **regs: int) -> None:
        """Append: set the registers, then run the vCPU once, bounded.

        Each run gets its own register block: the operations only point at
        it, and every block must still hold its values when the plan runs.
        """
        block = _abi().KvmRegs(**{**self.guest.regs, "rip": rip, **regs})
        self.blocks.append(block)
        plan.ioctl(STEP_SET_REGS, _VCPU, KVM_SET_REGS, self.addr(block))
        plan.run(self.timeout_ns, self.signo, value, _cookie())


def _setup_plan(s: _Session) -> _Plan:
    """Create the VM, its memory and vCPU; long mode reads the CPUID too."""
    plan = _Plan()
    plan.ioctl(STEP_API_VERSION, _KVM, KVM_GET_API_VERSION, value=_V_API,
               check=_CHECK_EQ, expect=KVM_API_VERSION)  # fmt: skip
    plan.ioctl(STEP_CREATE_VM, _KVM, KVM_CREATE_VM, 0, fd_out=_VM)
    plan.ioctl(STEP_MEMORY_REGION, _VM, KVM_SET_USER_MEMORY_REGION, s.addr(s.region))
    plan.ioctl(STEP_CREATE_VCPU, _VM, KVM_CREATE_VCPU, 0, fd_out=_VCPU)
    if s.guest.long_mode:
        plan.ioctl(STEP_GET_CPUID, _KVM, KVM_GET_SUPPORTED_CPUID, s.addr(s.cpuid))
    return plan


def _vcpu_plan(s: _Session) -> _Plan:
    """Give the vCPU its CPUID, mode and MSRs, and map its run area."""
    plan = _Plan()
    if s.guest.long_mode:
        plan.ioctl(STEP_SET_CPUID, _VCPU, KVM_SET_CPUID2, s.addr(s.cpuid))
    plan.ioctl(STEP_GET_SREGS, _VCPU, KVM_GET_SREGS, s.addr(s.sregs))
    for offset, size in s.spans:
        plan.copy(STEP_SET_SREGS, s.addr(s.sregs) + offset, s.addr(s.wanted) + offset, size)
    plan.ioctl(STEP_SET_SREGS, _VCPU, KVM_SET_SREGS, s.addr(s.sregs))
    plan.ioctl(STEP_RUN_AREA_SIZE, _KVM, KVM_GET_VCPU_MMAP_SIZE, value=_V_RUN_SIZE,
               check=_CHECK_GE, expect=_SIZEOF_KVM_RUN_MIN)  # fmt: skip
    plan.map_run(STEP_MAP_RUN_AREA)
    if s.guest.long_mode:
        plan.ioctl(STEP_SET_MSRS, _VCPU, KVM_SET_MSRS, s.addr(s.boot_msrs), value=_V_BOOT_MSRS)
        plan.ioctl(STEP_SET_MSRS, _KVM, KVM_GET_MSR_INDEX_LIST, s.addr(s.msr_list),
                   value=_V_MSR_LIST, soft=True)  # fmt: skip
        plan.ioctl(STEP_SET_MSRS, _KVM, KVM_GET_MSR_FEATURE_INDEX_LIST, s.addr(s.feature_list),
                   value=_V_FEATURE_LIST, soft=True)  # fmt: skip
        if s.result.cpuid.get("arch_capabilities"):
            # What QEMU does with -cpu host: read the feature MSR, set it.
            plan.ioctl(STEP_SET_MSRS, _KVM, KVM_GET_MSRS, s.addr(s.arch_msrs),
                       value=_V_ARCH_GET, soft=True)  # fmt: skip
            plan.ioctl(STEP_SET_MSRS, _VCPU, KVM_SET_MSRS, s.addr(s.arch_msrs),
                       value=_V_ARCH_SET, soft=True)  # fmt: skip
    return plan


def _read_cpuid(s: _Session) -> None:
    """Note the features the long-mode guest will find in its CPUID."""
    leaf1 = leaf7 = None
    for entry in s.cpuid.entries[: s.cpuid.nent]:
        if entry.function == 1:
            leaf1 = entry
        elif entry.function == 7 and entry.index == 0:
            leaf7 = entry
    s.result.cpuid = {
        "cx16": bool(leaf1 and leaf1.ecx & _CPUID1_ECX_CX16),
        "xsave": bool(leaf1 and leaf1.ecx & _CPUID1_ECX_XSAVE),
        "arch_capabilities": bool(leaf7 and leaf7.edx & _CPUID7_EDX_ARCH_CAPABILITIES),
    }


def _read_msrs(s: _Session) -> None:
    values = s.out.values
    set_count = int(values[_V_BOOT_MSRS])
    msrs: dict[str, object] = {
        "boot_msrs_set": set_count,
        "boot_msrs": len(BOOT_MSRS),
        "boot_msr_refused": BOOT_MSRS[set_count][0] if set_count < len(BOOT_MSRS) else None,
        "msr_index_list": int(values[_V_MSR_LIST]) >= 0,
    }
    if s.result.cpuid.get("arch_capabilities"):
        features = [s.feature_list.indices[i] for i in
                    range(min(s.feature_list.nmsrs, _MAX_MSR_INDICES))]  # fmt: skip
        got, put = int(values[_V_ARCH_GET]), int(values[_V_ARCH_SET])
        msrs["arch_capabilities"] = {
            "offered_by_cpuid": True,
            "feature_msr": MSR_IA32_ARCH_CAPABILITIES in features
            if values[_V_FEATURE_LIST] >= 0 else None,
            "value": f"{s.arch_msrs.entries[0].data:#x}" if got == 1 else None,
            "read": errno.errorcode.get(-got, got) if got < 0 else got == 1,
            "accepted": put == 1,
        }  # fmt: skip
    s.result.msrs = msrs


def _read_guest(s: _Session) -> None:
    """Decode a guest run: exit, registers, and the instruction it stopped at."""
    import ctypes

    result = s.result
    _decode_run(result, bytes(s.out.run_head))
    result.proof = int(s.regs.rax) & 0xFFFFFFFF
    result.rip = int(s.regs.rip)
    result.stage = int(s.regs.r15)
    if s.guest.long_mode:
        result.cx16_value = int.from_bytes(ctypes.string_at(s.mem_addr + s.guest.cx16_area, 16),
                                           "little")  # fmt: skip
        passed = result.exit_reason == KVM_EXIT_HLT and result.stage == 7
        if not passed:
            result.instruction = (s.guest.marks.get(result.rip)
                                  or STAGES.get(result.stage, "entering 64-bit mode"))  # fmt: skip


def _measure_speed(s: _Session) -> bool:
    """Time the guest loop; return False when it did not halt.

    Each KVM_RUN costs a fixed entry and exit (hundreds of microseconds when
    KVM itself runs under an emulator), so the loop's cost is the slope
    between a 1-iteration run and a longer one, never one run alone.  The
    longer run grows until its loop time dominates: on an emulating host the
    short one already does, so the probe stays within a few milliseconds.
    A verdict of "emulated" is measured twice, the faster kept: a first run
    can be slow for reasons that pass (a nested emulator translating KVM's
    own code the first time), and one cold sample must not fail a good host.
    """
    result = s.result
    plan = _Plan()
    s.run_plan(plan, s.guest.loop, _V_T_WARM, rcx=1)  # faults the pages in
    plan.ioctl(STEP_GET_REGS, _VCPU, KVM_GET_REGS, s.addr(s.regs))
    if not s.execute(plan):
        return False
    _decode_run(result, bytes(s.out.run_head))
    if result.exit_reason != KVM_EXIT_HLT:
        _read_guest(s)
        return False
    host_ns, note = _host_ns_per_iteration(1 << 16)
    best: tuple[float, int] | None = None
    implausible: tuple[float, int] | None = None
    plausible = 0
    for _ in range(3):  # at most two plausible samples; a third try for noise
        measured = _guest_slope(s)
        if measured is None:
            return False
        if host_ns is not None and measured[0] < _IMPLAUSIBLE_RATIO * host_ns:
            implausible = measured  # faster than the host CPU itself: noise
            continue
        plausible += 1
        if best is None or measured[0] < best[0]:
            best = measured
        if host_ns is None or best[0] / max(host_ns, 1e-9) < EMULATION_RATIO or plausible == 2:
            break
    if best is None:
        assert implausible is not None
        result.speed = Speed(implausible[0], None, implausible[1],
                             "the measurements were inconsistent (a guest loop faster than "
                             "the host CPU); no verdict is drawn from them")  # fmt: skip
    else:
        result.speed = Speed(best[0], host_ns, best[1], note)
    result.exit_reason = -1
    return True


def _guest_slope(s: _Session) -> tuple[float, int] | None:
    """(ns per loop iteration, iterations of the longer run), or None on failure."""
    values = s.out.values
    for slot in (_V_T_BASE, _V_T_BASE2, _V_T_SHORT, _V_T_LONG, _V_T_LONG2):
        values[slot] = 0  # run times add up across resumed runs
    # Noise only ever adds time: the minimum of two runs of each size.
    plan = _Plan()
    s.run_plan(plan, s.guest.loop, _V_T_BASE, rcx=1)
    s.run_plan(plan, s.guest.loop, _V_T_BASE2, rcx=1)
    s.run_plan(plan, s.guest.loop, _V_T_SHORT, rcx=_SPEED_SHORT)
    if not s.execute(plan):
        return None
    base = min(int(values[_V_T_BASE]), int(values[_V_T_BASE2]))
    extra, iterations = int(values[_V_T_SHORT]) - base, _SPEED_SHORT
    if extra < _SPEED_SLOW_NS:  # not yet above the noise of entry and exit
        plan = _Plan()
        s.run_plan(plan, s.guest.loop, _V_T_LONG, rcx=_SPEED_LONG)
        s.run_plan(plan, s.guest.loop, _V_T_LONG2, rcx=_SPEED_LONG)
        if not s.execute(plan):
            return None
        longest = min(int(values[_V_T_LONG]), int(values[_V_T_LONG2]))
        extra, iterations = longest - base, _SPEED_LONG
    return max(extra, 1) / (iterations - 1), iterations


def _run_guest(s: _Session) -> None:
    """The whole smoke test for one guest; failures land in the result.

    The real-mode guest is one array of operations (one foreign call with
    the native backend); the long-mode one is several, because what comes
    next depends on the CPUID KVM offers and on how fast the guest ran.
    """
    if s.guest.arch == "aarch64":
        ran = s.execute(_aarch64_plan(s))
        s.result.api_version = int(s.out.values[_V_API])
        if ran:
            _read_aarch64(s)
            s.result.step = STEP_DONE
        return
    final = _Plan()
    s.run_plan(final, s.guest.entry, _V_T_GUEST)
    final.ioctl(STEP_GET_REGS, _VCPU, KVM_GET_REGS, s.addr(s.regs))
    if not s.guest.long_mode:
        plan = _setup_plan(s)
        plan.ops += _vcpu_plan(s).ops + final.ops
        ran = s.execute(plan)
        s.result.api_version = int(s.out.values[_V_API])
        if ran:
            _read_guest(s)
            s.result.step = STEP_DONE
        return
    if not s.execute(_setup_plan(s)):
        return
    s.result.api_version = int(s.out.values[_V_API])
    _read_cpuid(s)
    if not s.execute(_vcpu_plan(s)):
        return
    _read_msrs(s)
    if not _measure_speed(s):
        return
    if not s.execute(final):
        return
    _read_guest(s)
    s.result.step = STEP_DONE


def _check_timeout(timeout: object) -> None:
    """Refuse a bound that is not a finite number of seconds in (0, MAX_TIMEOUT]."""
    import math

    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgumentError(f"timeout must be a number of seconds, got {timeout!r}")
    if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT):
        raise InvalidArgumentError(
            f"timeout must be more than 0 and at most {MAX_TIMEOUT:g} seconds, got {timeout!r}")


def _aarch64_plan(s: _Session) -> _Plan:
    """The whole arm64 smoke test as one array of operations."""
    plan = _setup_plan(s)
    plan.ioctl(STEP_ARM_TARGET, _VM, KVM_ARM_PREFERRED_TARGET, s.addr(s.vcpu_init))
    plan.ioctl(STEP_ARM_VCPU_INIT, _VCPU, KVM_ARM_VCPU_INIT, s.addr(s.vcpu_init))
    plan.ioctl(STEP_SET_ONE_REG, _VCPU, KVM_SET_ONE_REG, s.addr(s.set_pc))
    plan.ioctl(STEP_RUN_AREA_SIZE, _KVM, KVM_GET_VCPU_MMAP_SIZE, value=_V_RUN_SIZE,
               check=_CHECK_GE, expect=_SIZEOF_KVM_RUN_MIN)  # fmt: skip
    plan.map_run(STEP_MAP_RUN_AREA)
    plan.run(s.timeout_ns, s.signo, _V_T_GUEST, _cookie())
    plan.ioctl(STEP_GET_ONE_REG, _VCPU, KVM_GET_ONE_REG, s.addr(s.get_x0))
    return plan


def _read_aarch64(s: _Session) -> None:
    """Decode the arm64 run: the MMIO exit's address, value, and X0."""
    result, head = s.result, bytes(s.out.run_head)
    _decode_run(result, head)
    if result.exit_reason == KVM_EXIT_MMIO:
        length = int.from_bytes(head[_RUN_MMIO_LEN : _RUN_MMIO_LEN + 4], "little")
        result.mmio = {
            "phys_addr": int.from_bytes(head[_RUN_MMIO_ADDR : _RUN_MMIO_ADDR + 8], "little"),
            "data": int.from_bytes(head[_RUN_MMIO_DATA : _RUN_MMIO_DATA + min(length, 8)], "little"),
            "len": length, "is_write": bool(head[_RUN_MMIO_WRITE]),
        }  # fmt: skip
    result.proof = int(s.x0.value) & 0xFFFFFFFF


def _guest_for(kind: str) -> _Guest:
    if kind == "long-mode":
        guest: _Guest = _cached("guest-long", _long_mode_guest)
        return guest
    if kind == "real-mode":
        guest = _cached("guest-real", _real_mode_guest)
        return guest
    if kind == "aarch64":
        guest = _cached("guest-aarch64", _aarch64_guest)
        return guest
    raise InvalidArgumentError(f"guest must be 'real-mode' or 'long-mode', got {kind!r}")


def _backend_for(backend: str | None) -> Any:
    if backend not in (None, "native", "python"):
        raise InvalidArgumentError(f"backend must be 'native' or 'python', got {backend!r}")
    if backend != "python":
        lib, note = _cached("native", _load_native)
        if lib is not None:
            return _NativeBackend(lib)
        if backend == "native":
            raise InternalError(
                f"the native smoke test is not available: {note}",
                cause="native-missing",
                fix="run `make` in the boxlite_syscheck directory, or set "
                f"{LIBRARY_ENV} to the absolute path of libkvmsmoke.so",
            )
    return _PythonBackend()


def smoke_test(
    fd: int,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    backend: str | None = None,
    guest: str = "real-mode",
    _guest: bytes | None = None,
    _program: _Guest | None = None,
) -> SmokeResult:
    """Run guest code in a throwaway VM on an open /dev/kvm descriptor.

    ``guest`` is "real-mode" (the bare device check: ``mov eax; hlt``) or
    "long-mode" (what a stock kernel needs: 64-bit mode, CX16, XSAVE, the
    boot MSRs, and the speed of guest code against the host CPU).
    ``backend`` is "native" (libkvmsmoke.so), "python", or None for the
    native one when it can be used.  Never raises for a KVM failure: the
    result says how far it got.  Raises InternalError when the native backend
    is asked for and cannot be used, InvalidArgumentError for a bad argument.
    """
    import time

    _check_timeout(timeout)
    program = _program or (_real_mode_guest(_guest) if _guest is not None else _guest_for(guest))
    runner = _backend_for(backend)
    result = SmokeResult(runner.name, timeout, program.name)
    start = time.perf_counter()
    try:
        session = _Session(fd, program, runner, result, max(1, int(timeout * 1e9)))
    except _StepFailed as failed:
        result.step, result.error = failed.step, failed.error
        return result
    try:
        _run_guest(session)
    finally:
        session.close()
    result.elapsed = time.perf_counter() - start
    return result


# ── Host facts (read only on error paths and for the report) ────────────────


def _kvm_modules() -> list[str]:
    """KVM modules loaded now, from /sys/module (built-in ones show too)."""
    names = ("kvm_intel", "kvm_amd", "kvm_pvm", "kvm")
    return [name for name in names if _exists(f"/sys/module/{name}")]


def _cpuinfo_field(field: str) -> str | None:
    """The first value of a /proc/cpuinfo field, or None."""
    text = _read_text("/proc/cpuinfo") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == field:
            return value.strip()
    return None


def _cpu_flags() -> set[str] | None:
    """The x86 CPU flags, or None when /proc/cpuinfo has none."""
    flags = _cpuinfo_field("flags")
    return set(flags.split()) if flags is not None else None


def _root_fs_type() -> str | None:
    """The filesystem type mounted at / in this mount namespace."""
    for line in (_read_text("/proc/self/mountinfo") or "").splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/" and " - " in line:
            kind = line.split(" - ", 1)[1].split()
            if kind:
                return kind[0]
    return None


def _kernel_release() -> str:
    return os.uname().release


def _node_kind(st: os.stat_result) -> str:
    """What kind of file a stat result describes."""
    import stat

    for test, kind in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISDIR, "directory"), (stat.S_ISREG, "regular file")):  # fmt: skip
        if test(st.st_mode):
            return kind
    return "special file"


def _describe_node(st: os.stat_result) -> str:
    import stat

    kind = _node_kind(st)
    if kind.endswith("device"):
        kind += f" {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return f"{kind}, owner {_user_name(st.st_uid)}, group {_group_name(st.st_gid)}, mode {stat.S_IMODE(st.st_mode):04o}"


def _who(uid: int) -> str:
    """"alice (uid 1000)", or "uid 65533" when the uid has no name."""
    name = _user_name(uid)
    return f"uid {uid}" if name == str(uid) else f"{name} (uid {uid})"


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _group_membership(gid: int) -> tuple[str | None, bool, bool]:
    """Return (user name, listed in the group database, held by this process)."""
    import grp
    import pwd

    held = gid == os.getegid() or gid in os.getgroups()
    try:
        user = pwd.getpwuid(os.geteuid())
    except KeyError:
        return None, False, held
    try:
        members = grp.getgrgid(gid).gr_mem
    except KeyError:
        members = []
    return user.pw_name, user.pw_gid == gid or user.pw_name in members, held


# ── Host evidence: gathered once, as one value ──────────────────────────────

_OVERFLOW_ID = 65534  # what an unmapped uid or gid shows as inside a user namespace
# POSIX ACL xattr entries (include/uapi/linux/posix_acl.h, posix_acl_xattr.h).
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20)  # fmt: skip
_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture
_LANDLOCK_CREATE_RULESET_VERSION = 1


class Evidence:
    """What the host shows about reaching /dev/kvm, read once.

    A plain value: the diagnosis is a pure function of (step, errno, this),
    and tests build one directly.  Every field that could not be read is
    None, never an exception.
    """

    __slots__ = (
        "acl", "arch", "cpu_flags", "egid", "euid", "flatpak", "groups", "group_exists",
        "group_listed", "kubernetes", "kvm_modules", "kvm_registered", "landlock_abi", "lsm",
        "lsm_context",
        "module_available", "mount", "no_new_privs", "node", "path", "private_dev",
        "runtime", "runtime_evidence", "seccomp", "snap", "user", "userns", "vendor", "wsl",
    )  # fmt: skip

    acl: list[dict[str, Any]] | None
    arch: str | None
    cpu_flags: set[str] | None
    egid: int | None
    euid: int | None
    flatpak: bool | None
    groups: tuple[int, ...]
    group_exists: bool | None
    group_listed: bool | None
    kubernetes: bool | None
    kvm_modules: list[str]
    kvm_registered: bool | None
    landlock_abi: int | None
    lsm: list[str] | None
    lsm_context: str | None
    module_available: dict[str, bool]
    mount: dict[str, Any] | None
    no_new_privs: bool | None
    node: dict[str, Any] | None
    path: str | None
    private_dev: bool | None
    runtime: str | None
    runtime_evidence: list[str]
    seccomp: str | None
    snap: str | None
    user: str | None
    userns: dict[str, Any] | None
    vendor: str | None
    wsl: str | None

    def __init__(self, **fields: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, fields.get(name))
        self.groups = fields.get("groups") or ()
        self.kvm_modules = fields.get("kvm_modules") or []
        self.runtime_evidence = fields.get("runtime_evidence") or []
        self.module_available = fields.get("module_available") or {}

    def as_dict(self) -> dict[str, object]:
        out = {name: getattr(self, name) for name in self.__slots__}
        out["cpu_flags"] = sorted({"vmx", "svm", "hypervisor"} & (self.cpu_flags or set()))
        out["groups"] = list(self.groups)
        return out

    def __repr__(self) -> str:
        return f"<Evidence {self.path}: node {self.node}, runtime {self.runtime}>"

    # Questions the rules ask.
    @property
    def in_userns(self) -> bool:
        return self.userns is not None and not self.userns.get("identity", True)

    @property
    def contained(self) -> str | None:
        """The container-like context this process runs in, by name."""
        if self.kubernetes:
            return "kubernetes"
        if self.flatpak:
            return "flatpak"
        if self.snap:
            return "snap"
        return self.runtime

    def is_kvm_node(self) -> bool:
        node = self.node or {}
        return (node.get("kind") == "character device"
                and (node.get("major"), node.get("minor")) == (KVM_DEVICE_MAJOR, KVM_DEVICE_MINOR))  # fmt: skip


def _getxattr(path: str, name: str) -> bytes | None:
    """An extended attribute's value, or None (seam)."""
    try:
        return os.getxattr(path, name)
    except (OSError, AttributeError):
        return None


def _parse_acl(raw: bytes | None) -> list[dict[str, object]] | None:
    """system.posix_acl_access: version (u32), then (tag u16, perm u16, id u32) entries."""
    if not raw or len(raw) < 4:
        return None
    names = {_ACL_USER_OBJ: "user_obj", _ACL_USER: "user", _ACL_GROUP_OBJ: "group_obj",
             _ACL_GROUP: "group", _ACL_MASK: "mask", _ACL_OTHER: "other"}  # fmt: skip
    entries = []
    for at in range(4, len(raw) - 7, 8):
        tag = int.from_bytes(raw[at : at + 2], "little")
        perm = int.from_bytes(raw[at + 2 : at + 4], "little")
        ident = int.from_bytes(raw[at + 4 : at + 8], "little")
        entries.append({"tag": names.get(tag, str(tag)), "perm": perm,
                        "id": ident if tag in (_ACL_USER, _ACL_GROUP) else None})  # fmt: skip
    return entries


def _mount_of(path: str) -> dict[str, object] | None:
    """The mount holding ``path``: mount point, type, source and options."""
    try:
        target = os.path.realpath(path)
    except OSError:
        target = path
    best: dict[str, object] | None = None
    for line in (_read_text("/proc/self/mountinfo") or "").splitlines():
        head, _, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) < 6 or len(rest) < 2:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(str(best["point"]))):
            best = {"point": point, "fstype": rest[0], "source": rest[1],
                    "options": fields[5].split(",")}  # fmt: skip
    return best


def _userns() -> dict[str, object] | None:
    uid_map = _read_text("/proc/self/uid_map")
    gid_map = _read_text("/proc/self/gid_map")
    if uid_map is None:
        return None
    identity = " ".join(uid_map.split()) == "0 0 4294967295"
    return {"identity": identity, "uid_map": uid_map.strip(), "gid_map": (gid_map or "").strip()}


def _runtime() -> tuple[str | None, list[str]]:
    """The container runtime, with what showed it."""
    seen: list[str] = []
    runtime = None
    environ = os.environ.get("container", "")
    if environ:
        seen.append(f"container={environ} in the environment")
        runtime = {"oci": "containerd", "lxc-libvirt": "lxc"}.get(environ, environ)
    if _exists("/run/.containerenv"):
        seen.append("/run/.containerenv")
        runtime = runtime or "podman"
    cgroup = _read_text("/proc/1/cgroup") or ""
    for hint, name in (("kubepods", "containerd"), ("libpod", "podman"), ("docker", "docker"),
                       ("containerd", "containerd"), ("lxc", "lxc"), ("machine.slice", "systemd-nspawn")):  # fmt: skip
        if hint in cgroup:
            seen.append(f"/proc/1/cgroup mentions {hint}")
            runtime = runtime or name
            break
    if _exists("/.dockerenv") and _root_fs_type() in ("overlay", "fuse-overlayfs"):
        seen.append("/.dockerenv on an overlay root")
        runtime = runtime or "docker"
    if runtime is None and cgroup.strip() == "0::/" and _root_fs_type() in ("overlay", "fuse-overlayfs"):
        # cgroup v2 with its own namespace: /proc/1/cgroup says only "0::/".
        seen.append("a private cgroup namespace (0::/) on an overlay root")
        runtime = "container"
    return runtime, seen


def _landlock_abi() -> int | None:
    """The Landlock ABI this kernel offers, or None when it has none."""
    import ctypes

    try:
        libc = _sys_libc()
    except OSError:
        return None
    abi = libc.syscall(_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                       ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))  # fmt: skip
    return int(abi) if abi > 0 else None


def _status_field(name: str) -> str | None:
    for line in (_read_text("/proc/self/status") or "").splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


def _module_available(name: str) -> bool:
    """Whether the running kernel ships module ``name`` (modules.dep)."""
    deps = _read_text(f"/lib/modules/{_kernel_release()}/modules.dep") or ""
    return f"/{name.replace('_', '-')}.ko" in deps or f"/{name}.ko" in deps


def _wsl_version() -> str | None:
    release = _kernel_release()
    if "microsoft-standard" in release.lower() or _exists(_WSL_INTEROP) and "WSL2" in release:
        return "2"
    if release.endswith("-Microsoft"):
        return "1"
    return "2" if _exists(_WSL_INTEROP) else None


def _gather_evidence(path: str = KVM_DEVICE, *, context_only: bool = False) -> Evidence:
    """Read everything the rules may ask about (error paths and the report only).

    ``context_only`` reads just where this process runs (runtime, namespaces,
    sandbox, LSM), for the report's host.context finding.
    """
    if context_only:
        runtime, seen = _runtime()
        dev = _mount_of("/dev")
        lsm = (_read_text("/sys/kernel/security/lsm") or "").strip()
        return Evidence(
            path=path, userns=_userns(), runtime=runtime, runtime_evidence=seen,
            kubernetes=bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
            or _exists("/var/run/secrets/kubernetes.io/serviceaccount")
            or "kubepods" in (_read_text("/proc/1/cgroup") or ""),
            flatpak=_exists("/.flatpak-info"), snap=os.environ.get("SNAP_NAME"),
            private_dev=bool(dev and dev.get("fstype") == "tmpfs"),
            no_new_privs=_status_field("NoNewPrivs") == "1", seccomp=_status_field("Seccomp"),
            landlock_abi=_landlock_abi(), lsm=lsm.split(",") if lsm else [],
            lsm_context=(_read_text("/proc/self/attr/current") or "").strip("\x00\n ") or None,
            wsl=_wsl_version(),
        )  # fmt: skip
    import grp
    import stat

    node: dict[str, Any] | None = None
    try:
        st = _stat(path)
        kind = _node_kind(st)
        device = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        node = {"kind": kind, "major": os.major(st.st_rdev) if device else None,
                "minor": os.minor(st.st_rdev) if device else None, "uid": st.st_uid,
                "gid": st.st_gid, "mode": stat.S_IMODE(st.st_mode),
                "owner": _user_name(st.st_uid), "group": _group_name(st.st_gid)}  # fmt: skip
    except OSError:
        pass
    user, listed, _ = _group_membership(int(node["gid"])) if node else (None, False, False)
    try:
        grp.getgrnam("kvm")
        group_exists = True
    except KeyError:
        group_exists = False
    where = _gather_evidence(path, context_only=True)
    fields = {name: getattr(where, name) for name in Evidence.__slots__}
    fields.update(
        euid=os.geteuid(), egid=os.getegid(),
        groups=tuple(sorted({os.getegid(), *os.getgroups()})), user=user,
        node=node, acl=_parse_acl(_getxattr(path, "system.posix_acl_access")),
        mount=_mount_of(path),
        arch={"amd64": "x86_64", "arm64": "aarch64"}.get(os.uname().machine, os.uname().machine),
        cpu_flags=_cpu_flags(), vendor=_cpuinfo_field("vendor_id"), kvm_modules=_kvm_modules(),
        # KVM registered its misc device: it initialised (on arm64, /sys/module/kvm
        # exists even when KVM gave up for want of EL2).
        kvm_registered=_exists("/sys/class/misc/kvm"),
        module_available={m: _module_available(m) for m in ("kvm_pvm", "kvm_intel", "kvm_amd")},
        group_listed=listed, group_exists=group_exists,
    )  # fmt: skip
    return Evidence(**fields)


# ── Reaching the device: (step, errno, evidence) in, one cause out ──────────


def _perm_allows(perm: int) -> bool:
    return perm & 0o6 == 0o6


def _acl_denier(ev: Evidence) -> str | None:
    """The ACL entry that denies this process read-write, or None when the
    ACL (if any) lets it in or does not decide (POSIX.1e access check)."""
    acl, node = ev.acl or [], ev.node or {}
    if not acl or ev.euid == node.get("uid"):
        return None
    mask = next((e["perm"] for e in acl if e["tag"] == "mask"), 0o7)
    assert isinstance(mask, int)
    named = [e for e in acl if e["tag"] == "user" and e["id"] == ev.euid]
    if named:
        perm = named[0]["perm"]
        assert isinstance(perm, int)
        return None if _perm_allows(perm & mask) else f"user:{ev.euid}:{perm & mask:o}"
    groups = [e for e in acl if (e["tag"] == "group_obj" and node.get("gid") in ev.groups)
              or (e["tag"] == "group" and e["id"] in ev.groups)]  # fmt: skip
    if groups:
        if any(_perm_allows(int(str(e["perm"])) & mask) for e in groups):
            return None
        return "mask" if not _perm_allows(mask) else "group entries without rw"
    return None


def _mode_lets_in(ev: Evidence) -> bool:
    """Whether the mode bits (or ACL) let this process read and write."""
    node = ev.node or {}
    mode = int(node.get("mode", 0))
    if ev.euid == 0 and not ev.in_userns:
        return True
    if ev.euid == node.get("uid"):
        return _perm_allows(mode >> 6)
    if node.get("gid") in ev.groups:
        return _perm_allows(mode >> 3)
    return _perm_allows(mode)


def _policies(ev: Evidence) -> list[tuple[str, str, str]]:
    """The sandboxes the evidence shows: (name, what shows it, the fix)."""
    found = []
    if ev.flatpak:
        found.append(("flatpak", "/.flatpak-info", "`flatpak override --device=kvm APP` "
                      "(or --device=all), then restart the app"))  # fmt: skip
    if ev.snap:
        found.append(("snap", f"SNAP_NAME={ev.snap}", f"`sudo snap connect {ev.snap}:kvm`"))
    if ev.lsm_context and ev.lsm_context not in ("unconfined", "kernel"):
        if "_t:" in ev.lsm_context or ev.lsm_context.count(":") >= 3:
            found.append(("SELinux", f"context {ev.lsm_context}",
                          "allow kvm_device_t for this domain (for containers: `setsebool -P "
                          "container_use_devices on`); see `ausearch -m avc -ts recent`"))  # fmt: skip
        else:
            found.append(("AppArmor", f"profile {ev.lsm_context}",
                          "allow `/dev/kvm rw,` in that profile; see the apparmor=\"DENIED\" "
                          "lines of `dmesg`"))  # fmt: skip
    if ev.seccomp == "2":
        found.append(("seccomp", "Seccomp: 2 (filter)",
                      "allow openat of /dev/kvm and ioctl on it in the seccomp policy"))  # fmt: skip
    # Last: Landlock is only possible (its domains are not visible), the
    # others above are shown by the evidence.
    if ev.landlock_abi and ev.no_new_privs:
        found.append(("Landlock", f"Landlock ABI {ev.landlock_abi} and NoNewPrivs 1; a Landlock "
                      "domain is not visible from /proc, so it is possible, not shown",
                      "allow /dev/kvm read-write (LANDLOCK_ACCESS_FS_READ_FILE|WRITE_FILE) and "
                      "its ioctls (LANDLOCK_ACCESS_FS_IOCTL_DEV) in the sandbox's ruleset"))  # fmt: skip
    return found


def _node_text(ev: Evidence) -> str:
    node = ev.node
    if not node:
        return "missing"
    kind = node["kind"]
    if node.get("major") is not None:
        kind += f" {node['major']}:{node['minor']}"
    return f"{kind}, owner {node['owner']}, group {node['group']}, mode {int(node['mode']):04o}"


def _pass_in_fix(ev: Evidence) -> str:
    """How to give this context the host's /dev/kvm."""
    where = ev.contained
    if where == "kubernetes":
        return ("request the device from a device plugin (resources.limits "
                "devices.kubevirt.io/kvm: 1, or a generic device plugin), or run the pod "
                "privileged with a hostPath volume for /dev/kvm")
    if where == "flatpak":
        return "`flatpak override --device=kvm APP` (or --device=all), then restart the app"
    if where == "snap":
        return f"`sudo snap connect {ev.snap}:kvm`"
    if where == "lxc":
        return "`lxc config device add CONTAINER kvm unix-char path=/dev/kvm`"
    if where == "systemd-nspawn":
        return "start it with `--bind=/dev/kvm` and `--property=DeviceAllow='/dev/kvm rw'`"
    if where is None and ev.private_dev:
        return ("this process has a private /dev without the device (systemd PrivateDevices=, "
                "a sandbox): set PrivateDevices=no or DeviceAllow=/dev/kvm rw and "
                "BindPaths=/dev/kvm for the service, or pass the device in")
    return ("start the container with `--device /dev/kvm` (docker, podman, nerdctl); in a "
            "compose file, `devices: [\"/dev/kvm:/dev/kvm\"]`")


def _no_virt_fix(ev: Evidence) -> str:
    if ev.arch == "aarch64":
        return ("KVM on arm64 needs the kernel started at EL2: boot it on bare metal or with "
                "firmware that hands over EL2; on a cloud VM, use an instance type with "
                "nested virtualization or a bare-metal one")
    flags = ev.cpu_flags or set()
    if "hypervisor" in flags:
        if ev.module_available.get("kvm_pvm"):
            return "load the paravirtual KVM this kernel ships: `sudo modprobe kvm_pvm`"
        return ("enable nested virtualization for this VM on its host (on a cloud, an "
                "instance type that offers it), then load kvm_intel or kvm_amd")
    return ("enable Intel VT-x or AMD-V (SVM) in the BIOS/UEFI setup, then "
            f"`sudo modprobe {_module_for(ev)}`")


def _module_for(ev: Evidence) -> str:
    flags = ev.cpu_flags or set()
    if "svm" in flags or ev.vendor in ("AuthenticAMD", "HygonGenuine"):
        return "kvm_amd"
    if "vmx" in flags or ev.vendor == "GenuineIntel":
        return "kvm_intel"
    return "kvm_intel or kvm_amd"


_DRIVERS = ("kvm_intel", "kvm_amd", "kvm_pvm")

#: The access rules, in order: the first whose predicate holds names the cause.
#: Each is (cause, predicate on (step, errno, evidence)); _explain() words it.
ACCESS_RULES: tuple[tuple[str, Callable[[int, int, Evidence], bool]], ...] = (
    ("kvm-wsl1", lambda st, e, ev: st == STEP_OPEN and e == errno.ENOENT and ev.wsl == "1"),
    ("kvm-missing-wsl", lambda st, e, ev: st == STEP_OPEN and e == errno.ENOENT and ev.wsl == "2"),
    ("kvm-not-kvm-device", lambda st, e, ev: (ev.node is not None and not ev.is_kvm_node()
     and (st == STEP_OPEN or e in (errno.ENOTTY, errno.EINVAL)))
     or (st in (STEP_API_VERSION, STEP_CREATE_VM) and e == errno.ENOTTY)
     or (st == STEP_API_VERSION and e == errno.EINVAL)),
    ("kvm-missing-container", lambda st, e, ev: st == STEP_OPEN and e == errno.ENOENT
     and (ev.contained is not None or bool(ev.private_dev))),
    ("kvm-node-missing", lambda st, e, ev: st == STEP_OPEN and e == errno.ENOENT
     and (bool(ev.kvm_registered) or any(m in ev.kvm_modules for m in _DRIVERS))),
    ("kvm-module-not-loaded", lambda st, e, ev: st == STEP_OPEN and e == errno.ENOENT
     and ev.arch != "aarch64" and bool({"vmx", "svm"} & (ev.cpu_flags or set()))),
    ("kvm-no-virtualization", lambda st, e, ev: st == STEP_OPEN and e == errno.ENOENT),
    ("kvm-no-driver", lambda st, e, ev: st == STEP_OPEN and e in (errno.ENXIO, errno.ENODEV)),
    ("kvm-device-cgroup", lambda st, e, ev: st == STEP_OPEN and e == errno.EPERM
     and ev.contained not in (None, "flatpak", "snap")),
    ("kvm-nodev", lambda st, e, ev: st == STEP_OPEN and e == errno.EACCES
     and "nodev" in (ev.mount or {}).get("options", ())),
    ("kvm-userns", lambda st, e, ev: st == STEP_OPEN and e == errno.EACCES and ev.in_userns
     and not _mode_lets_in(ev)),
    ("kvm-acl-denies", lambda st, e, ev: st == STEP_OPEN and e == errno.EACCES
     and _acl_denier(ev) is not None),
    ("kvm-mode-no-group", lambda st, e, ev: st == STEP_OPEN and e == errno.EACCES
     and not _mode_lets_in(ev) and not _perm_allows(int((ev.node or {}).get("mode", 0)) >> 3)),
    ("kvm-stale-session", lambda st, e, ev: st == STEP_OPEN and e == errno.EACCES
     and not _mode_lets_in(ev) and bool(ev.group_listed)),
    ("kvm-not-in-group", lambda st, e, ev: st == STEP_OPEN and e == errno.EACCES
     and not _mode_lets_in(ev)),
    ("kvm-policy", lambda st, e, ev: e in (errno.EACCES, errno.EPERM)),
)  # fmt: skip


def diagnose_access(step: int, err: int, ev: Evidence) -> BoxliteError | None:
    """The cause of a failure to reach or use the device, from the evidence.

    A pure function: the first rule of ACCESS_RULES that holds names the
    cause, and _explain() says it with its evidence and its one fix (or,
    where the evidence fits several causes, the checks to run in order).
    None when no rule applies.
    """
    for cause, holds in ACCESS_RULES:
        if holds(step, err, ev):
            return _explain(cause, step, err, ev)
    return None


def _explain(cause: str, step: int, err: int, ev: Evidence) -> BoxliteError:
    path = ev.path or KVM_DEVICE
    tried = (f"open {path} read-write as {_who(int(ev.euid or 0))}" if step == STEP_OPEN
             else STEP_NAMES[step])  # fmt: skip
    answer = errno_name(err)
    node = _node_text(ev)
    group = (ev.node or {}).get("group", "kvm")
    user = ev.user or "$USER"
    context = ev.contained or ("a private /dev" if ev.private_dev else None)
    if cause == "kvm-wsl1":
        return _failure(UnsupportedError, cause,
                        f"{path} does not exist: WSL 1 has no KVM at all",
                        tried=tried, answer=answer, kernel=_kernel_release(),
                        fix="convert the distribution to WSL 2: `wsl --set-version DISTRO 2` "
                        "(in Windows), then enable nested virtualization")  # fmt: skip
    if cause == "kvm-missing-wsl":
        return _failure(UnsupportedError, cause,
                        f"{path} does not exist: this WSL 2 instance has no nested virtualization",
                        tried=tried, answer=answer, kernel=_kernel_release(),
                        fix="nested virtualization in WSL 2 needs Windows 11: set "
                        "nestedVirtualization=true under [wsl2] in %UserProfile%\\.wslconfig, "
                        "then `wsl --shutdown` and start WSL again")  # fmt: skip
    if cause == "kvm-not-kvm-device":
        what = f"it is a {node}" if ev.node else f"it answers {STEP_NAMES[step]} with {answer}"
        return _failure(UnsupportedError, cause, f"{path} is not the KVM device: {what}",
                        tried=tried, answer=answer, device=node,
                        expected=f"character device {KVM_DEVICE_MAJOR}:{KVM_DEVICE_MINOR}",
                        fix=(f"remove what is at {path} (a `docker -v /dev/kvm:/dev/kvm` on a "
                             "host without KVM leaves a directory) and " + _pass_in_fix(ev))
                        if context else
                        f"remove what is at {path} and recreate it: `sudo mknod {path} c "
                        f"{KVM_DEVICE_MAJOR} {KVM_DEVICE_MINOR}` (or let udev do it)")  # fmt: skip
    if cause == "kvm-missing-container":
        return _failure(UnsupportedError, cause,
                        f"{path} does not exist in this {context} (the host's device was not "
                        "passed in)", tried=tried, answer=answer, context=context,
                        seen=", ".join(ev.runtime_evidence) or None, fix=_pass_in_fix(ev))  # fmt: skip
    if cause == "kvm-node-missing":
        loaded = ", ".join(m for m in ev.kvm_modules if m != "kvm") or "kvm"
        return _failure(UnsupportedError, cause, f"{loaded} is loaded but {path} does not exist",
                        tried=tried, answer=answer, kvm_modules_loaded=loaded,
                        fix=f"create the node: `sudo mknod {path} c {KVM_DEVICE_MAJOR} "
                        f"{KVM_DEVICE_MINOR} && sudo chmod 0660 {path}` (udev normally does "
                        "it: check that it runs)")  # fmt: skip
    if cause == "kvm-module-not-loaded":
        module = _module_for(ev)
        return _failure(UnsupportedError, cause,
                        f"{path} does not exist: the CPU has {'AMD-V' if module == 'kvm_amd' else 'VT-x'} "
                        "but no KVM module is loaded", tried=tried, answer=answer,
                        fix=f"`sudo modprobe {module}` (if it fails with 'Operation not "
                        "supported', enable virtualization in the firmware setup)")  # fmt: skip
    if cause == "kvm-no-virtualization":
        flags = ev.cpu_flags or set()
        if ev.arch == "aarch64":
            summary, why = f"{path} does not exist: the kernel was not started at EL2", "kvm-no-el2"
        elif ev.module_available.get("kvm_pvm") and "hypervisor" in flags:
            summary, why = f"{path} does not exist: kvm_pvm is available but not loaded", "kvm-pvm-not-loaded"
        elif "hypervisor" in flags:
            summary, why = (f"{path} does not exist: this machine is itself a VM whose hypervisor "
                            "does not pass VT-x/AMD-V through", "kvm-no-nested")
        else:
            summary, why = f"{path} does not exist and the CPU reports no VT-x/AMD-V", cause
        return _failure(UnsupportedError, why, summary, tried=tried, answer=answer,
                        kernel=_kernel_release(), kvm_modules_loaded=", ".join(ev.kvm_modules) or "none",
                        fix=_no_virt_fix(ev))  # fmt: skip
    if cause == "kvm-no-driver":
        return _failure(UnsupportedError, cause, f"{path} exists but no KVM driver answers for it",
                        tried=tried, answer=answer, device=node,
                        kvm_modules_loaded=", ".join(ev.kvm_modules) or "none",
                        fix=_no_virt_fix(ev) if ev.arch == "aarch64"
                        else f"load the KVM module: `sudo modprobe {_module_for(ev)}`")  # fmt: skip
    if cause == "kvm-device-cgroup":
        fix = ("request the device from a device plugin (devices.kubevirt.io/kvm) or run the "
               "pod privileged" if ev.kubernetes else
               "pass it with `--device /dev/kvm` (a `-v /dev/kvm:/dev/kvm` bind mount is not "
               "allowed by the device cgroup), or `--device-cgroup-rule='c 10:232 rwm'`")  # fmt: skip
        return _failure(UnsupportedError, cause,
                        f"{path} is refused by the container's device cgroup (EPERM even as root)",
                        tried=tried, answer=answer, context=context, device=node, fix=fix)  # fmt: skip
    if cause == "kvm-nodev":
        mount = ev.mount or {}
        return _failure(UnsupportedError, cause,
                        f"{path} looks right but sits on a filesystem mounted nodev "
                        f"({mount.get('point')}, {mount.get('fstype')})",
                        tried=tried, answer=answer, device=node,
                        mount=f"{mount.get('point')} {','.join(mount.get('options', []))}",
                        fix="bind-mount the host's node instead (`mount --bind /dev/kvm "
                        f"{path}`); in a user namespace every new mount is nodev, so pass the "
                        "device in (`--device /dev/kvm`)")  # fmt: skip
    if cause == "kvm-userns":
        node_info = ev.node or {}
        if node_info.get("gid") == _OVERFLOW_ID:
            # Two causes fit: the runtime dropped the host user's groups, or the
            # host user never had the group.  Say both, with the check first.
            why = ("the device's group is not mapped into this user namespace (it shows as "
                   f"{node_info.get('group')}) and this process does not hold it")
            fix = ("check in this order: (1) run `id` as the host user: if it lists the "
                   "device's group, the runtime dropped it: keep it with `podman run "
                   "--group-add keep-groups` (crun); (2) if not, add the host user to it "
                   "(`sudo usermod -aG kvm USER` on the host) or give it an ACL (`sudo setfacl "
                   "-m u:USER:rw /dev/kvm`)")
        else:
            why = "the host user of this user namespace has no access to the node"
            fix = (f"on the host, add that user to group {group} (`sudo usermod -aG {group} "
                   "USER`) or give it an ACL (`sudo setfacl -m u:USER:rw /dev/kvm`)")
        root = " (root here is not root on the host)" if ev.euid == 0 else ""
        return _failure(UnsupportedError, cause, f"{path}: permission denied in a user namespace"
                        f"{root}: {why}", tried=tried, answer=answer, device=node,
                        uid_map=(ev.userns or {}).get("uid_map"), fix=fix)  # fmt: skip
    if cause == "kvm-acl-denies":
        return _failure(UnsupportedError, cause,
                        f"{path}: permission denied by its access control list "
                        f"({_acl_denier(ev)})", tried=tried, answer=answer, device=node,
                        acl=", ".join(f"{e['tag']}{':' + str(e['id']) if e['id'] is not None else ''}:{e['perm']:o}"
                                      for e in (ev.acl or [])),
                        fix=f"`sudo setfacl -m u:{user}:rw {path}` (or remove the entry that "
                        f"denies: `getfacl {path}`)")  # fmt: skip
    if cause == "kvm-mode-no-group":
        return _failure(UnsupportedError, cause,
                        f"{path}: permission denied, and its mode "
                        f"{int((ev.node or {}).get('mode', 0)):04o} lets no group in",
                        tried=tried, answer=answer, device=node, fix=_group_access_fix(path, ev.user))  # fmt: skip
    if cause == "kvm-stale-session":
        return _failure(UnsupportedError, cause,
                        f"{path}: permission denied: {user} is in group {group}, but this "
                        "session started before that and does not have it",
                        tried=tried, answer=answer, device=node,
                        fix=f"log out and back in (or start a shell with the group: `newgrp "
                        f"{group}`); a running login session does not pick up new groups")  # fmt: skip
    if cause == "kvm-not-in-group":
        return _failure(UnsupportedError, cause,
                        f"{path}: permission denied: {user} is not in group {group}",
                        tried=tried, answer=answer, device=node,
                        fix=f"`sudo usermod -aG {group} {user}`, then log out and back in (a "
                        "running login session does not pick up new groups)")  # fmt: skip
    # kvm-policy: the mode lets this process in, so a policy refused it.
    policies = _policies(ev)
    what = "opening" if step == STEP_OPEN else "an ioctl on"
    if len(policies) == 1:
        name, shown, fix = policies[0]
        return _failure(UnsupportedError, f"kvm-{name.lower()}-denied",
                        f"{what} {path} is refused by {name} (the device's mode lets this "
                        "process in)", tried=tried, answer=answer, device=node, sandbox=shown,
                        fix=fix)  # fmt: skip
    checks = [f"({i}) {name} ({shown}): {fix}" for i, (name, shown, fix) in enumerate(policies, 1)]
    if not checks:
        checks = ["(1) the audit log (`ausearch -m avc -ts recent`, `dmesg`) for an LSM "
                  "denial", "(2) the sandbox or service manager that started this process "
                  "(seccomp, Landlock, systemd DevicePolicy=)"]
    return _failure(UnsupportedError, "kvm-access-policy",
                    f"{what} {path} is refused by a policy, although the device's mode lets "
                    "this process in", tried=tried, answer=answer, device=node,
                    sandboxes=", ".join(p[0] for p in policies) or "none visible",
                    fix="more than one policy could refuse it; check in this order: "
                    + "; ".join(checks) if len(checks) > 1 else checks[0])  # fmt: skip


# ── Diagnosis: evidence in, one cause and one fix out ───────────────────────


def _label(key: str) -> str:
    """An evidence key as a label: "kvm_provider" -> "KVM provider"."""
    words = key.split("_")
    words = [w.upper() if w in ("kvm", "cpuid", "cpu", "msr", "msrs") else w for w in words]
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def _failure(
    cls: type[BoxliteError],
    cause: str,
    summary: str,
    *,
    tried: str,
    answer: str,
    fix: str,
    **evidence: object,
) -> BoxliteError:
    """Build an error whose text says what was tried, the answer and the fix."""
    lines = [summary, "", f"Tried: {tried}", f"Answer: {answer}"]
    lines += [f"{_label(key)}: {value}" for key, value in evidence.items()]
    lines += ["", f"Fix: {fix}"]
    evidence = {"tried": tried, "answer": answer, **evidence}
    return cls("\n".join(lines), cause=cause, evidence=evidence, fix=fix)


def _group_access_fix(path: str, user: str | None) -> str:
    """Give the kvm group access to the node, creating the group if needed."""
    import grp

    steps = []
    try:
        grp.getgrnam("kvm")
    except KeyError:
        steps.append("`sudo groupadd --system kvm` (this host has no kvm group)")
    steps += [
        "write the udev rule `KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\"` to "
        "/etc/udev/rules.d/65-kvm.rules",
        "`sudo udevadm control --reload && sudo udevadm trigger --name-match=kvm`",
        f"`sudo usermod -aG kvm {user or '$USER'}`, then log out and back in",
    ]
    return "; then ".join(steps)


def _resource_exhausted(path: str, step: int, err: int) -> BoxliteError:
    tried = STEP_NAMES[step]
    answer = errno_name(err)
    if err == errno.EMFILE:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return _failure(
            ResourceExhaustedError, "fd-limit",
            f"this process hit its open-file limit (RLIMIT_NOFILE {soft})",
            tried=tried, answer=answer, limit=f"soft {soft}, hard {hard}",
            fix="raise the limit (`ulimit -n`, LimitNOFILE= for a service) or close "
            "descriptors this process leaks",
        )  # fmt: skip
    if err == errno.ENFILE:
        file_max = (_read_text("/proc/sys/fs/file-max") or "?").strip()
        return _failure(
            ResourceExhaustedError, "system-file-limit",
            f"the system-wide open-file limit is reached (fs.file-max {file_max})",
            tried=tried, answer=answer,
            fix="raise fs.file-max (`sysctl -w fs.file-max=...`) or stop what holds the files",
        )  # fmt: skip
    return _failure(
        ResourceExhaustedError, "out-of-memory",
        "the kernel could not allocate memory for the VM",
        tried=tried, answer=answer,
        fix="free memory, or raise this process's memory limit (cgroup memory.max, "
        "`ulimit -v`)",
    )  # fmt: skip


_GUEST_TRIED = {
    "real-mode": f"run real-mode guest code (mov eax, {PROOF_VALUE:#x}; hlt) in a new VM",
    "long-mode": "run a 64-bit long-mode guest (cpuid, lock cmpxchg16b, xsave, hlt) in a new VM",
    "aarch64": f"run arm64 guest code (x0 = {PROOF_VALUE:#x}; str w0, [{_ARM64_MMIO:#x}]) in a "
    "new VM",
}

_NESTED_FIX = (
    "enable nested virtualization for this machine on its host (cloud instances "
    "need it switched on explicitly) and make sure kvm_intel or kvm_amd is loaded"
)


def _exit_failure(result: SmokeResult) -> BoxliteError:
    """The error for a smoke test that ran KVM_RUN but did not pass."""
    kernel = _kernel_release()
    tried = _GUEST_TRIED.get(result.guest, f"run the {result.guest} guest in a new VM")
    arm = result.guest == "aarch64"
    expected = KVM_EXIT_MMIO if arm else KVM_EXIT_HLT
    nested = (f"{KVM_DEVICE} exists but cannot run guest code: the kernel must run at EL2 "
              "with KVM working (on a cloud VM, an instance type with nested virtualization "
              "or bare metal)") if arm else f"{KVM_DEVICE} exists but cannot run guest code: " + _NESTED_FIX
    if result.timed_out:
        return _failure(
            UnsupportedError, "smoke-timeout",
            f"KVM smoke test failed: the guest did not halt within {result.timeout:g} s",
            tried=tried, answer=f"KVM_RUN was still running after {result.timeout:g} s",
            backend=result.backend, kernel=kernel,
            fix="retry with a longer --timeout if the host is heavily loaded; if it "
            "persists: " + nested,
        )  # fmt: skip
    reason = result.exit_reason
    if reason == expected:
        seen = (f"MMIO {result.mmio} and X0 {result.proof:#x}" if arm
                else f"EAX {result.proof:#x}")  # fmt: skip
        return _failure(
            UnsupportedError, "smoke-no-proof",
            "KVM smoke test failed: the guest stopped as expected but did not run the "
            "expected code",
            tried=tried, answer=f"{exit_name(reason)} with {seen}, "
            f"expected {PROOF_VALUE:#x}", backend=result.backend, kernel=kernel,
            fix="this KVM implementation mis-executes guest code: update the host "
            "kernel (and the outer hypervisor, if nested) and report it to its vendor",
        )  # fmt: skip
    if reason == KVM_EXIT_FAIL_ENTRY:
        answer = (
            f"{exit_name(reason)}, hardware entry failure reason "
            f"{result.hardware_entry_failure_reason:#x} on CPU {result.fail_entry_cpu}"
        )
        summary = "KVM smoke test failed: the CPU refused to enter the guest"
    elif reason == KVM_EXIT_INTERNAL_ERROR:
        sub = result.internal_suberror
        answer = f"{exit_name(reason)}, suberror {INTERNAL_SUBERRORS.get(sub, 'UNLISTED')} ({sub})"
        summary = "KVM smoke test failed: KVM hit an internal error running the guest"
    elif reason == KVM_EXIT_SHUTDOWN:
        answer = f"{exit_name(reason)} (the guest triple-faulted)"
        summary = "KVM smoke test failed: the vCPU shut down instead of running the guest"
    else:
        answer = exit_name(reason)
        summary = f"KVM smoke test failed: unexpected exit {exit_name(reason)}"
    return _failure(
        UnsupportedError, "smoke-exit",
        summary + f" (expected {exit_name(expected)})",
        tried=tried, answer=answer, backend=result.backend, kernel=kernel, fix=nested,
    )  # fmt: skip


def _kvm_provider() -> str:
    """The KVM module that drives the CPU, by name ("kvm_pvm", "kvm_intel", ...)."""
    arch = [m for m in _kvm_modules() if m != "kvm"]
    return arch[0] if arch else "unknown"


def _stopped_at(result: SmokeResult) -> str:
    """Where and how the long-mode guest stopped, with what KVM reported."""
    text = f"{result.instruction} stopped the guest: {exit_name(result.exit_reason)}"
    if result.exit_reason == KVM_EXIT_INTERNAL_ERROR:
        sub = result.internal_suberror
        text += f", suberror {INTERNAL_SUBERRORS.get(sub, 'UNLISTED')} ({sub})"
    elif result.exit_reason == KVM_EXIT_FAIL_ENTRY:
        text += f", hardware entry failure reason {result.hardware_entry_failure_reason:#x}"
    elif result.exit_reason == KVM_EXIT_SHUTDOWN:
        text += " (the guest triple-faulted)"
    elif result.exit_reason == KVM_EXIT_HLT:
        text += f" with EAX {result.proof:#x}, not the proof value"
    if result.insn_bytes:
        text += f"; instruction bytes {result.insn_bytes.hex(' ')}"
    if result.rip >= 0:
        text += f"; RIP {result.rip:#x}"
    return text


def _real_guest_failure(result: SmokeResult, engine: str | None = DEFAULT_ENGINE) -> BoxliteError | None:
    """The error for the long-mode guest: what a real engine's guest needs.

    Precedence: a run that never ended, then emulation (which explains any
    instruction failure that comes with it), then the instruction that
    failed, then an MSR every direct-boot VMM sets.
    """
    if result.timed_out:
        return _exit_failure(result)
    tried = ("run a 64-bit guest loop (dec ecx; jnz) under KVM, and the same "
             "loop on the host CPU")  # fmt: skip
    kernel = _kernel_release()
    guest = _stopped_at(result) if not result.ok else "the stock-kernel instructions ran"
    if result.emulated and result.speed is not None:
        speed = result.speed
        ratio = speed.ratio or 0.0
        summary = (f"guest code is emulated in software: {_ns(speed.guest_ns)} ns per "
                   f"iteration, about {_times(ratio)} times the host")  # fmt: skip
        provider = _kvm_provider()
        if provider == "kvm_pvm":
            return _failure(
                UnsupportedError, "guest-emulated-pvm",
                summary + ". This KVM is kvm_pvm: only PVM-enabled guest kernels run at "
                "hardware speed, and a stock guest kernel (BoxLite's included) has its "
                "kernel-mode code run through KVM's instruction emulator",
                tried=tried, answer=speed.describe(), kvm_provider=provider,
                stock_kernel_instructions=guest, backend=result.backend, kernel=kernel,
                fix="run a PVM-enabled guest kernel with an engine that supports PVM, or "
                "move to a host whose CPU gives KVM VT-x/AMD-V: bare metal, or a cloud VM "
                "with nested virtualization enabled",
            )  # fmt: skip
        return _failure(
            UnsupportedError, "guest-emulated", summary,
            tried=tried, answer=speed.describe(), kvm_provider=provider,
            stock_kernel_instructions=guest, backend=result.backend, kernel=kernel,
            fix="run on a host whose KVM executes guest code in hardware: VT-x/AMD-V "
            "enabled in the firmware, or nested virtualization enabled for this VM "
            "on its host",
        )  # fmt: skip
    if not result.ok:
        return _failure(
            UnsupportedError, "guest-instruction-failed",
            "KVM cannot run what a stock Linux kernel runs early: " + guest,
            tried="enter 64-bit long mode directly (as Firecracker, cloud-hypervisor and "
            "libkrun boot Linux) and run cpuid, lock cmpxchg16b, xsetbv, xsave64, xrstor64",
            answer=guest, cpuid_offered=_offered(result), backend=result.backend,
            kernel=kernel, kvm_provider=_kvm_provider(),
            fix="update the host kernel (and the outer hypervisor, if this host is "
            "itself a VM) and report the instruction and bytes above to the KVM provider",
        )  # fmt: skip
    refused = result.msrs.get("boot_msr_refused")
    if refused:
        return _failure(
            UnsupportedError, "msr-refused",
            f"KVM refuses the MSR {refused} that direct-boot VMMs set before Linux starts",
            tried=STEP_NAMES[STEP_SET_MSRS],
            answer=f"KVM_SET_MSRS set {result.msrs.get('boot_msrs_set')} of "
            f"{len(BOOT_MSRS)} MSRs and stopped at {refused}",
            backend=result.backend, kernel=kernel, kvm_provider=_kvm_provider(),
            fix="update the host kernel (and the outer hypervisor, if nested); "
            "Firecracker and libkrun cannot boot a guest without this MSR",
        )  # fmt: skip
    arch = result.msrs.get("arch_capabilities")
    if engine == "qemu" and isinstance(arch, dict) and not arch.get("accepted"):
        return _failure(
            UnsupportedError, "msr-arch-capabilities-refused",
            "QEMU with -cpu host would abort at start: the supported CPUID offers "
            "ARCH_CAPABILITIES, but KVM refuses to set MSR 0x10a",
            tried="read MSR 0x10a as a feature MSR (KVM_GET_MSRS on /dev/kvm) and set it "
            "on a vCPU (KVM_SET_MSRS), as QEMU does",
            answer=f"value {arch.get('value')}, accepted: no", kernel=kernel,
            kvm_provider=_kvm_provider(),
            fix="start QEMU with -cpu host,-arch-capabilities (or a named CPU model), "
            "or update the host kernel",
        )  # fmt: skip
    return None


def _offered(result: SmokeResult) -> str:
    names = [name for name, on in result.cpuid.items() if on]
    return ", ".join(names) or "none of cx16, xsave, arch_capabilities"


def diagnose(result: SmokeResult, path: str = KVM_DEVICE,
             engine: str | None = DEFAULT_ENGINE) -> BoxliteError | None:  # fmt: skip
    """Map a smoke-test result to the error for its cause; None when it passed.

    For the long-mode guest a result can pass its instructions and still be
    refused: guest code that runs emulated cannot boot a real guest.
    """
    step, err = result.step, result.error
    if step == STEP_DONE or (step == STEP_RUN and result.timed_out):
        if result.guest == "long-mode":
            return _real_guest_failure(result, engine)
        return None if result.ok else _exit_failure(result)
    if err in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        return _resource_exhausted(path, step, err)
    if step == STEP_OPEN or err in (errno.EACCES, errno.EPERM, errno.ENOTTY, errno.EINVAL):
        access = diagnose_access(step, err, _gather_evidence(path))
        if access is not None:
            return access
    if step == STEP_OPEN:
        return _failure(
            UnsupportedError, "kvm-open-failed", f"{path} cannot be opened",
            tried=f"open {path} read-write", answer=errno_name(err),
            fix="see the answer above; the device must open read-write for this user",
        )  # fmt: skip
    if step == STEP_API_VERSION and err == 0:
        return _failure(
            UnsupportedError, "kvm-api-version",
            f"KVM reports API version {result.api_version}, expected {KVM_API_VERSION}",
            tried=STEP_NAMES[step], answer=f"version {result.api_version}",
            kernel=_kernel_release(),
            fix=f"use a kernel whose KVM speaks API version {KVM_API_VERSION} "
            "(every mainline kernel since 2.6.22)",
        )  # fmt: skip
    if step == STEP_CREATE_VM and err == errno.EBUSY:
        return _failure(
            UnsupportedError, "kvm-busy",
            "KVM cannot create a VM: another hypervisor holds the CPU's virtualization "
            "extensions",
            tried=STEP_NAMES[step], answer=errno_name(err),
            fix="quit the other hypervisor (VirtualBox, VMware) or unload its module, "
            "then retry",
        )  # fmt: skip
    return _failure(
        EngineError, "kvm-step-failed",
        f"KVM smoke test failed: could not {STEP_NAMES[step]}",
        tried=STEP_NAMES[step], answer=errno_name(err) if err else "no errno",
        backend=result.backend, kernel=_kernel_release(),
        fix="this KVM refuses a basic operation every VMM needs: update the kernel, "
        "and report the answer above to the KVM provider if it persists",
    )  # fmt: skip


# ── Report pieces ───────────────────────────────────────────────────────────

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


def _timed(findings: list[Finding], make: Callable[[], Finding]) -> None:
    """Append make()'s finding with its duration."""
    import time

    start = time.perf_counter()
    finding = make()
    finding.duration_s = time.perf_counter() - start
    findings.append(finding)


def _from_error(id: str, error: BoxliteError) -> Finding:
    summary = error.detail.split("\n", 1)[0]
    finding = Finding(id, FAIL, summary, {"cause": error.cause, **error.evidence}, error.fix)
    finding.error = error
    return finding


# ── Probes ──────────────────────────────────────────────────────────────────


class HypervisorProbe:
    """Platform-specific hypervisor checks.

    ``startup_check()`` raises a BoxliteError when the host cannot run VMs;
    ``diagnose_create_failure(error)`` never raises and returns a more
    precise error than the one given, or that one unchanged.
    """

    name = "none"

    def acquire(self, timeout: float = DEFAULT_TIMEOUT, backend: str | None = None,
                engine: str | None = DEFAULT_ENGINE) -> tuple[int | None, SmokeResult | None]:  # fmt: skip
        """Validate the host; return (open device or None, smoke result or None)."""
        raise NotImplementedError

    def startup_check(self, timeout: float = DEFAULT_TIMEOUT, backend: str | None = None,
                      engine: str | None = DEFAULT_ENGINE) -> None:  # fmt: skip
        """One-time validation; raises BoxliteError when the host is unusable."""
        fd, _ = self.acquire(timeout, backend, engine)
        if fd is not None:
            os.close(fd)

    def diagnose_create_failure(self, error: BoxliteError) -> BoxliteError:
        """Refine an engine's VM-creation error; the default keeps it."""
        return error

    def findings(self, timeout: float, backend: str | None, probe_hvf: bool,
                 engine: str | None = DEFAULT_ENGINE) -> list[Finding]:  # fmt: skip
        """Everything the report shows for this platform."""
        raise NotImplementedError


class UnsupportedPlatformProbe(HypervisorProbe):
    """Any system other than Linux and macOS: BoxLite does not run there."""

    name = "unsupported"

    def __init__(self, system: str) -> None:
        self.system = system

    def __repr__(self) -> str:
        return f"UnsupportedPlatformProbe({self.system!r})"

    def _error(self) -> BoxliteError:
        return UnsupportedError(
            f"BoxLite only supports Linux and macOS (this is {self.system})",
            cause="platform-unsupported",
            evidence={"platform": self.system},
            fix="run on Linux with KVM or on macOS on Apple Silicon",
        )

    def acquire(self, timeout: float = DEFAULT_TIMEOUT, backend: str | None = None,
                engine: str | None = DEFAULT_ENGINE) -> tuple[int | None, SmokeResult | None]:  # fmt: skip
        raise self._error()

    def findings(self, timeout: float, backend: str | None, probe_hvf: bool,
                 engine: str | None = DEFAULT_ENGINE) -> list[Finding]:  # fmt: skip
        return [_from_error("platform", self._error())]


class KvmProbe(HypervisorProbe):
    """Linux: open /dev/kvm and run guest code in a throwaway VM."""

    name = "kvm"

    def __init__(self, machine: str, path: str = KVM_DEVICE) -> None:
        self.machine = machine
        self.path = path

    def __repr__(self) -> str:
        return f"KvmProbe({self.machine!r}, path={self.path!r})"

    @property
    def can_smoke_test(self) -> bool:
        # The guests and structures are those of a 64-bit process; a 32-bit
        # interpreter on a 64-bit kernel would pass KVM the wrong layouts.
        return self.machine in _SMOKE_MACHINES and sys.maxsize > 2**32

    def acquire(self, timeout: float = DEFAULT_TIMEOUT, backend: str | None = None,
                engine: str | None = DEFAULT_ENGINE) -> tuple[int | None, SmokeResult | None]:  # fmt: skip
        """Open the device and smoke-test it; the caller owns the descriptor.

        With an engine the guest is the long-mode one a real kernel needs
        (and its speed); with ``engine=None`` the trivial real-mode guest.
        """
        _check_engine(engine)
        _check_timeout(timeout)
        fd = self._open(timeout)
        try:
            if engine is not None and _speaks_kvm(fd):
                # Cheap: one KVM_CHECK_EXTENSION each.  An engine that would
                # not start is told before any guest runs.  (A device that is
                # not KVM is left to the smoke test's diagnosis.)
                error = _capability_error(engine, self.arch,
                                          _capability_values(fd, _engine_caps(engine, self.arch)))  # fmt: skip
                if error is not None:
                    raise error
            if not self.can_smoke_test:
                _log("debug", "no smoke test for %s: %s opened, guest code not run",
                     self.machine, self.path)  # fmt: skip
                return fd, None
            result = smoke_test(fd, timeout=timeout, backend=backend, guest=self._guest_kind(engine))
            error = diagnose(result, self.path, engine)
        except BaseException:
            os.close(fd)
            raise
        if error is not None:
            os.close(fd)
            raise error
        return fd, result

    def _guest_kind(self, engine: str | None) -> str:
        """The guest that proves what ``engine`` needs on this architecture."""
        if self.arch == "aarch64":
            return "aarch64"
        return "real-mode" if engine is None else "long-mode"

    @property
    def arch(self) -> str:
        """The architecture as the engine table names it."""
        return {"amd64": "x86_64", "arm64": "aarch64"}.get(self.machine, self.machine)

    def _open(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Open the device as a VMM does; raise the diagnosed error."""
        try:
            return _open_device(self.path)
        except OSError as err:
            failed = SmokeResult("none", timeout)
            failed.error = err.errno or 0
            error = diagnose(failed, self.path)
            assert error is not None
            raise error from err

    def findings(self, timeout: float, backend: str | None, probe_hvf: bool,
                 engine: str | None = DEFAULT_ENGINE) -> list[Finding]:  # fmt: skip
        _check_engine(engine)
        _check_timeout(timeout)
        if engine is not None and self.can_smoke_test:
            return self._engine_findings(timeout, backend, engine)
        found: list[Finding] = []
        _timed(found, self._device_finding)
        holder: list[int] = []
        _timed(found, lambda: self._usable_finding(timeout, backend, holder))
        smoke = found.pop()
        if smoke.error is not None:
            found = _blame_the_device(found, smoke.error)
        else:
            found.append(smoke)
        guest: SmokeResult | None = None
        if holder:
            fd = holder[0]
            try:
                if engine is not None and self.can_smoke_test:
                    guest = smoke_test(fd, timeout=timeout, backend=backend, guest="long-mode")
                    found += _guest_findings(guest, diagnose(guest, self.path))
                _timed(found, lambda: _capabilities_finding(fd))
            finally:
                os.close(fd)
        else:
            found.append(Finding("kvm.capabilities", SKIP, "not read: the device is not usable"))
        _timed(found, lambda: self._groups_finding())
        _timed(found, _module_finding)
        _timed(found, lambda: _cpu_finding(bool(holder), guest))
        _timed(found, _context_finding)
        return found

    def _engine_findings(self, timeout: float, backend: str | None, engine: str) -> list[Finding]:
        """The report for an engine: one long-mode VM shows every layer.

        The device works when its guest code ran; the real-guest layers
        follow; then every engine's verdict from the capabilities, the
        start-up ioctls (on a throwaway VM of their own) and the guest.
        """
        found: list[Finding] = []
        _timed(found, self._device_finding)
        try:
            fd = self._open(timeout)
        except BoxliteError as open_error:
            found = _blame_the_device(found, open_error)
            found.append(Finding("kvm.capabilities", SKIP, "not read: the device does not open"))
            return found + self._host_findings(None)
        try:
            guest = smoke_test(fd, timeout=timeout, backend=backend,
                               guest=self._guest_kind(engine))  # fmt: skip
            caps = _capability_values(fd, _all_caps(self.arch))
            # The start-up ioctls the table lists are x86's.
            ioctls = _probe_startup_ioctls(fd) if self.arch == "x86_64" else {}
        finally:
            os.close(fd)
        error = _capability_error(engine, self.arch, caps) or diagnose(guest, self.path, engine)
        cause = error.cause if error is not None else ""
        ran = guest.speed is not None or guest.step == STEP_DONE
        if not ran:
            found.append(_from_error("kvm.smoke", error) if error is not None else
                         Finding("kvm.smoke", FAIL, "no guest code ran", guest.as_dict()))  # fmt: skip
        else:
            found.append(Finding("kvm.smoke", PASS, "the device works: guest code ran and halted "
                                 f"({guest.backend} backend)", {"backend": guest.backend,
                                 "bound": guest.bound, "runs": guest.runs}))  # fmt: skip
            if guest.guest == "long-mode":
                guest_error = error if cause in _GUEST_CAUSES or cause == "smoke-timeout" else None
                found += _guest_findings(guest, guest_error)
            elif error is not None and cause not in _START_CAUSES:
                found[-1] = _from_error("kvm.smoke", error)
        verdicts = _engine_verdicts(self.arch, caps, ioctls, guest, self.path)
        for name, verdict in verdicts.items():
            found.append(_engine_finding(name, verdict, name == engine,
                                         error if name == engine and cause in _START_CAUSES else None))  # fmt: skip
        found.append(_capability_finding(caps))
        return found + self._host_findings(guest)

    def diagnose_create_failure(self, error: BoxliteError, engine: str | None = DEFAULT_ENGINE,
                                timeout: float = DEFAULT_TIMEOUT) -> BoxliteError:  # fmt: skip
        """Refine the error an engine returned when it could not create or run a VM.

        The host is checked again, for that engine: when the check fails now,
        its error (the group, the emulation, a missing capability...) is the
        precise one.  Otherwise the engine's message is decoded (capability
        numbers and names, errno values) into an EngineError that says what
        they mean; an error with nothing to decode is returned unchanged.
        Never raises for a host problem.
        """
        try:
            fd, _ = self.acquire(timeout, None, engine)
        except (InternalError, InvalidArgumentError):
            raise
        except BoxliteError as precise:
            return precise
        if fd is not None:
            os.close(fd)
        decoded = decode_engine_message(str(error))
        if not decoded:
            return error
        return EngineError(
            f"{error.detail or error}\n\nDecoded: {'; '.join(decoded)}\n\nThis host passes the "
            f"check for {engine}, so the cause lies in what the engine asked for, not in KVM's "
            "availability.",
            cause="engine-error-decoded", evidence={"engine_message": str(error), "decoded": decoded},
        )  # fmt: skip

    def _host_findings(self, guest: SmokeResult | None) -> list[Finding]:
        found: list[Finding] = []
        _timed(found, lambda: self._groups_finding())
        _timed(found, _module_finding)
        _timed(found, lambda: _cpu_finding(guest is not None, guest))
        _timed(found, _context_finding)
        return found

    def _device_finding(self) -> Finding:
        import stat

        try:
            st = _stat(self.path)
        except OSError as err:
            return Finding("kvm.device", FAIL, f"{self.path} is missing",
                           {"path": self.path, "errno": errno.errorcode.get(err.errno or 0)})  # fmt: skip
        node = _describe_node(st)
        is_kvm = stat.S_ISCHR(st.st_mode) and (
            os.major(st.st_rdev), os.minor(st.st_rdev)) == (KVM_DEVICE_MAJOR, KVM_DEVICE_MINOR)  # fmt: skip
        evidence = {"path": self.path, "node": node}
        if is_kvm:
            return Finding("kvm.device", PASS, f"{self.path}: {node}", evidence)
        return Finding("kvm.device", WARN,
                       f"{self.path} is not character device {KVM_DEVICE_MAJOR}:{KVM_DEVICE_MINOR}: {node}",
                       evidence)  # fmt: skip

    def _usable_finding(self, timeout: float, backend: str | None, holder: list[int]) -> Finding:
        try:
            fd, result = self.acquire(timeout, backend, engine=None)
        except (InternalError, InvalidArgumentError):
            raise  # the checker's own failure, or the caller's: not a host verdict
        except BoxliteError as error:
            return _from_error("kvm.smoke", error)
        assert fd is not None
        holder.append(fd)
        if result is None:
            return Finding("kvm.smoke", WARN,
                           f"{self.path} opens, but guest code was not run: no smoke test for {self.machine} yet",
                           {"machine": self.machine, "smoke_tested": False},
                           "")  # fmt: skip
        summary = (f"the device works: a trivial guest ran and halted (proof {result.proof:#x}, "
                   f"{result.elapsed * 1e3:.2f} ms, {result.backend} backend)")  # fmt: skip
        if result.bound == "none":
            return Finding("kvm.smoke", WARN, summary + "; the run was unbounded: no timer "
                           "and no watchdog thread could be had", result.as_dict(),
                           "raise RLIMIT_SIGPENDING and the thread limit of this process")  # fmt: skip
        return Finding("kvm.smoke", PASS, summary, result.as_dict())

    def _groups_finding(self) -> Finding:
        try:
            st = _stat(self.path)
        except OSError:
            return Finding("kvm.groups", SKIP, f"{self.path} is missing: no group to check")
        uid = os.geteuid()
        gid = st.st_gid
        group = _group_name(gid)
        user, listed, held = _group_membership(gid)
        evidence = {"user": user, "uid": uid, "device_group": group,
                    "listed_in_group_db": listed, "process_has_group": held,
                    "process_groups": sorted({os.getegid(), *os.getgroups()})}  # fmt: skip
        import stat

        if uid == 0:
            return Finding("kvm.groups", INFO, "running as root: the device mode does not apply",
                           evidence)  # fmt: skip
        if stat.S_IMODE(st.st_mode) & 0o006 == 0o006:
            return Finding("kvm.groups", INFO,
                           f"{self.path} is open to every user (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}): no group is needed", evidence)  # fmt: skip
        if uid == st.st_uid:
            return Finding("kvm.groups", INFO, f"{user} owns {self.path}", evidence)
        if held:
            return Finding("kvm.groups", PASS, f"this process has group {group}", evidence)
        if listed:
            return Finding("kvm.groups", WARN,
                           f"{user} is in group {group} but this session predates it",
                           evidence,
                           f"log out and back in (or `newgrp {group}`)")  # fmt: skip
        return Finding("kvm.groups", INFO, f"{user} is not in group {group}", evidence)


# ── Decoding what engines say ───────────────────────────────────────────────

# The shapes engines print (../shared/research/engine-requirements.md):
# Firecracker "Missing KVM capabilities: [0x24]", libkrun "Missing KVM
# capabilities: SetTssAddr", cloud-hypervisor "Capability missing: Irqchip",
# crosvm "missing required hypervisor capability ImmediateExit", QEMU "kvm
# does not support KVM_CAP_SET_TSS_ADDR"; errnos as "Error(13)", "os error 2",
# "code: 16", "failed: 16 Device or resource busy".
_ERRNO_PATTERNS = (r"Error\((\d+)\)", r"os error (\d+)", r"code: (\d+)",
                   r"failed: (\d+) [A-Z]")  # fmt: skip


def _cap_from_rust_name(word: str) -> str | None:
    """"SetTssAddr" -> "SET_TSS_ADDR", when that is a capability we know."""
    import re

    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", word).upper()
    aliases = {"ARM_PSCI02": "ARM_PSCI_0_2", "SET_IDENTITY_MAP_ADDRESS": "SET_IDENTITY_MAP_ADDR"}
    name = aliases.get(name, name)
    return name if name in KVM_CAPS else None


def decode_engine_message(message: str) -> list[str]:
    """Name the capability numbers, capability names and errno values in an
    engine's error message: ["KVM_CAP_IOEVENTFD (36) is missing", ...]."""
    import re

    found: list[str] = []
    caps: list[str] = []
    for listing in re.findall(r"[Mm]issing KVM capabilities:\s*\[([^\]]*)\]", message):
        for number in re.findall(r"0x[0-9a-fA-F]+|\d+", listing):
            value = int(number, 0)
            caps.append(KVM_CAP_NAMES.get(value, f"unknown capability {value}"))
    for word in re.findall(r"(?:[Mm]issing KVM capabilities:|Capability missing:|missing required "
                           r"hypervisor capability)\s*([A-Za-z][A-Za-z0-9]*)", message):  # fmt: skip
        name = _cap_from_rust_name(word)
        if name:
            caps.append(name)
    caps += re.findall(r"KVM_CAP_([A-Z0-9_]+)", message)
    for name in dict.fromkeys(caps):
        label = _cap_label(name) if name in KVM_CAPS else name
        found.append(f"{label} is missing")
    for pattern in _ERRNO_PATTERNS:
        for number in re.findall(pattern, message):
            value = int(number)
            if value in errno.errorcode:
                text = f"errno {value} is {errno_name(value)}"
                if text not in found:
                    found.append(text)
    return found


# ── Engines: what each needs, probed on this host ───────────────────────────

# Causes that stop a guest once the engine has started, and causes that stop
# the engine from starting.
_GUEST_CAUSES = frozenset({"guest-emulated", "guest-emulated-pvm", "guest-instruction-failed",
                           "msr-refused", "msr-arch-capabilities-refused"})  # fmt: skip
_START_CAUSES = frozenset({"kvm-capability-missing"})
_LIMIT_CAPS = ("MAX_VCPUS", "NR_VCPUS", "NR_MEMSLOTS")


def _speaks_kvm(fd: int) -> bool:
    """Whether the descriptor answers KVM_GET_API_VERSION with 12."""
    try:
        return _ioctl(fd, KVM_GET_API_VERSION) == KVM_API_VERSION
    except _SysError:
        return False


def _engine_caps(engine: str, arch: str) -> tuple[str, ...]:
    required: tuple[str, ...] = ENGINE_REQUIREMENTS[engine]["required"].get(arch, ())
    return required


def _all_caps(arch: str) -> tuple[str, ...]:
    """Every capability some engine asks about on ``arch``, and the limits."""
    names = {name for row in ENGINE_REQUIREMENTS.values()
             for kind in ("required", "optional") for name in row[kind].get(arch, ())}  # fmt: skip
    return tuple(sorted(names | set(_LIMIT_CAPS), key=lambda n: KVM_CAPS[n]))


def _capability_values(fd: int, names: Sequence[str]) -> dict[str, int | str]:
    """KVM_CHECK_EXTENSION for each name: its value, or the errno's name."""
    values: dict[str, int | str] = {}
    for name in names:
        try:
            values[name] = _ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAPS[name])
        except _SysError as err:
            values[name] = errno.errorcode.get(err.errno or 0, "error")
    return values


def _missing(names: Sequence[str], values: Mapping[str, int | str]) -> list[str]:
    return [name for name in names if values.get(name) in (0, None) or isinstance(values.get(name), str)]


def _cap_label(name: str) -> str:
    return f"KVM_CAP_{name} ({KVM_CAPS[name]})"


def _seccomp_mode() -> str | None:
    """This process's seccomp mode from /proc/self/status ("0", "1", "2")."""
    for line in (_read_text("/proc/self/status") or "").splitlines():
        if line.startswith("Seccomp:"):
            return line.split(":", 1)[1].strip()
    return None


def _capability_error(engine: str, arch: str,
                      values: Mapping[str, int | str]) -> BoxliteError | None:  # fmt: skip
    """UnsupportedError naming every capability ``engine`` needs and KVM lacks."""
    missing = _missing(_engine_caps(engine, arch), values)
    if not missing:
        return None
    names = ", ".join(_cap_label(name) for name in missing)
    tried = f"KVM_CHECK_EXTENSION for the capabilities {engine} refuses to start without"
    answer = "; ".join(f"{_cap_label(n)}: {values.get(n)}" for n in missing)
    kernel = _kernel_release()
    if _seccomp_mode() == "2":
        # A filter can answer KVM_CHECK_EXTENSION itself: two causes fit.
        return _failure(
            UnsupportedError, "kvm-capability-missing",
            f"{engine} would not start: KVM reports {names} missing, and this process "
            "runs under a seccomp filter, which may be the one answering",
            tried=tried, answer=answer, seccomp="filter (mode 2)", kernel=kernel,
            kvm_provider=_kvm_provider(),
            fix="check in this order: (1) run `python3 -m boxlite_syscheck --engine "
            f"{engine}` outside this sandbox; if it passes there, allow KVM_CHECK_EXTENSION "
            "(and KVM's ioctls) in the seccomp policy; (2) otherwise the host's KVM lacks "
            "them: update the host kernel or the KVM module",
        )  # fmt: skip
    return _failure(
        UnsupportedError, "kvm-capability-missing",
        f"{engine} would not start: this KVM lacks {names}",
        tried=tried, answer=answer, kernel=kernel, kvm_provider=_kvm_provider(),
        fix=f"update the host kernel (or the {_kvm_provider()} module) to one whose KVM "
        f"offers {', '.join(missing)}; every mainline kernel since 5.10 does",
    )  # fmt: skip


def _close_later(fds: Sequence[int]) -> None:
    """Close VM descriptors in a thread: tearing down a VM with an in-kernel
    irqchip and PIT takes tens of milliseconds, which the report need not
    wait for.  They are closed all the same (see _wait_for_closes).  One
    closer thread serves the process; where none can be had, close now."""
    closer = _cached("closer", _start_closer)
    if closer is None:
        for fd in fds:
            os.close(fd)
        return
    closer.put(list(fds))


def _start_closer() -> Any:
    """The closer thread's queue, or None when no thread can be started."""
    import queue
    import threading

    jobs: queue.Queue[list[int]] = queue.Queue()

    def work() -> None:
        while True:
            fds = jobs.get()
            try:
                for fd in fds:
                    os.close(fd)
            finally:
                jobs.task_done()

    thread = threading.Thread(target=work, name="boxlite-syscheck-close", daemon=True)
    try:
        thread.start()
    except RuntimeError:
        return None
    # A forked child has no closer thread: it makes its own on first use.
    os.register_at_fork(after_in_child=lambda: _CACHE.pop("closer", None))
    return jobs


def _wait_for_closes() -> None:
    """Wait until every descriptor handed to _close_later is closed."""
    closer = _CACHE.get("closer")
    if closer is not None:
        closer.join()


def _probe_startup_ioctls(fd: int) -> dict[str, str | None]:
    """The VM ioctls engines issue at start-up, on throwaway VMs: each None
    when it worked, else the errno's name.  KVM_CREATE_IRQCHIP and the split
    irqchip exclude each other, so the latter gets a VM of its own."""
    import ctypes

    results: dict[str, str | None] = {}
    vms: list[int] = []

    def attempt(name: str, vm: int, request: int, arg: int = 0) -> None:
        try:
            _ioctl(vm, request, arg)
            results[name] = None
        except _SysError as err:
            results[name] = errno.errorcode.get(err.errno or 0, "error")

    try:
        for _ in range(2):
            vms.append(_ioctl(fd, KVM_CREATE_VM, 0))
    except _SysError as err:
        why = f"not tried: KVM_CREATE_VM {errno.errorcode.get(err.errno or 0, 'error')}"
        for name in ("KVM_SET_IDENTITY_MAP_ADDR", "KVM_SET_TSS_ADDR", "KVM_CREATE_IRQCHIP",
                     "KVM_CREATE_PIT2", "KVM_ENABLE_CAP(SPLIT_IRQCHIP)"):  # fmt: skip
            results.setdefault(name, why)
        _close_later(vms)
        return results
    # The addresses QEMU and the rust-vmm engines use, below 4 GiB.
    identity = ctypes.c_uint64(0xFFFBC000)
    pit = (ctypes.c_uint8 * _SIZEOF_KVM_PIT_CONFIG)()  # flags 0
    # struct kvm_enable_cap: cap (u32), flags (u32), args[4] (u64): args[0] is
    # the number of IOAPIC pins the split irqchip routes.
    split = (ctypes.c_uint8 * _SIZEOF_KVM_ENABLE_CAP).from_buffer_copy(
        KVM_CAPS["SPLIT_IRQCHIP"].to_bytes(4, "little") + bytes(4) + (24).to_bytes(8, "little")
        + bytes(_SIZEOF_KVM_ENABLE_CAP - 16))  # fmt: skip
    attempt("KVM_SET_IDENTITY_MAP_ADDR", vms[0], KVM_SET_IDENTITY_MAP_ADDR,
            ctypes.addressof(identity))  # fmt: skip
    attempt("KVM_SET_TSS_ADDR", vms[0], KVM_SET_TSS_ADDR, 0xFFFBD000)
    attempt("KVM_CREATE_IRQCHIP", vms[0], KVM_CREATE_IRQCHIP)
    if results["KVM_CREATE_IRQCHIP"] is None:
        attempt("KVM_CREATE_PIT2", vms[0], KVM_CREATE_PIT2, ctypes.addressof(pit))
    else:  # the PIT needs the in-kernel irqchip: its failure would be a consequence
        results["KVM_CREATE_PIT2"] = "not tried: KVM_CREATE_IRQCHIP failed"
    attempt("KVM_ENABLE_CAP(SPLIT_IRQCHIP)", vms[1], KVM_ENABLE_CAP, ctypes.addressof(split))
    _close_later(vms)
    return results


#: Verdicts, from best to worst.
WOULD_RUN = "would run"
WOULD_FAIL_GUEST = "would start but its guest would fail"
WOULD_NOT_START = "would not start"


def _engine_verdicts(arch: str, caps: Mapping[str, int | str],
                     ioctls: Mapping[str, str | None], guest: SmokeResult | None,
                     path: str = KVM_DEVICE) -> dict[str, dict[str, object]]:  # fmt: skip
    """Every engine's verdict on this host: start-up needs, then its guest."""
    verdicts: dict[str, dict[str, object]] = {}
    # The guest's diagnosis is the same for every engine but QEMU (which alone
    # sets ARCH_CAPABILITIES): made once, and once more for QEMU.
    shared = diagnose(guest, path, DEFAULT_ENGINE) if guest is not None else None
    for name, row in ENGINE_REQUIREMENTS.items():
        missing = _missing(row["required"].get(arch, ()), caps)
        absent = _missing(row["optional"].get(arch, ()), caps)
        failed = {call: answer for call in row["ioctls"]
                  if (answer := ioctls.get(call)) is not None and not answer.startswith("not tried")}
        untested = [call for call in row["ioctls"]
                    if (ioctls.get(call) or "").startswith("not tried")]  # fmt: skip
        why: list[str] = []
        if missing:
            why.append("missing " + ", ".join(_cap_label(n) for n in missing))
        why += [f"{call} fails: {answer}" for call, answer in failed.items()]
        guest_error = (diagnose(guest, path, name) if name == "qemu" and guest is not None
                       else shared)  # fmt: skip
        if guest_error is not None and guest_error.cause == "msr-arch-capabilities-refused":
            why.append(guest_error.detail.split("\n", 1)[0])  # QEMU aborts at start
            guest_error = None
        if why:
            verdict, reason = WOULD_NOT_START, "; ".join(why)
        elif guest_error is not None:
            verdict, reason = WOULD_FAIL_GUEST, guest_error.detail.split("\n", 1)[0].split(". ")[0]
        else:
            verdict, reason = WOULD_RUN, ""
        verdicts[name] = {
            "verdict": verdict,
            "why": reason or None,
            "cause": guest_error.cause if guest_error is not None and not why else (
                "kvm-capability-missing" if missing else ("startup-ioctl-failed" if failed else None)),
            "missing_capabilities": [{"name": n, "number": KVM_CAPS[n]} for n in missing],
            "optional_capabilities_absent": [{"name": n, "number": KVM_CAPS[n]} for n in absent],
            "failed_ioctls": failed,
            "untested_ioctls": untested,
            "boot": row["boot"],
            "devices": {purpose: _exists(node) for purpose, node in row["devices"].items()},
            "limits": {n.lower(): caps.get(n) for n in _LIMIT_CAPS},
        }  # fmt: skip
    return verdicts


def _engine_finding(name: str, verdict: Mapping[str, object], selected: bool,
                    error: BoxliteError | None) -> Finding:  # fmt: skip
    """One engine's verdict; only the selected engine's can fail the report."""
    text = f"{name} {verdict['verdict']}"
    if verdict["why"]:
        text += f": {verdict['why']}"
    if not selected:
        return Finding(f"engine.{name}", INFO, text, verdict)
    status = PASS if verdict["verdict"] == WOULD_RUN else FAIL
    finding = Finding(f"engine.{name}", status, text, verdict)
    if error is not None:
        finding.error, finding.fix = error, error.fix
        finding.evidence = {"cause": error.cause, **finding.evidence}
    return finding


def _capability_finding(caps: Mapping[str, int | str]) -> Finding:
    present = sum(1 for name, value in caps.items() if isinstance(value, int) and value > 0)
    summary = (f"{present} of {len(caps)} capabilities the engines ask about are offered; "
               f"up to {caps.get('MAX_VCPUS')} vCPUs, {caps.get('NR_MEMSLOTS')} memory slots")  # fmt: skip
    return Finding("kvm.capabilities", INFO, summary,
                   {name: {"number": KVM_CAPS[name], "value": value} for name, value in caps.items()})  # fmt: skip


def _blame_the_device(found: list[Finding], error: BoxliteError) -> list[Finding]:
    """One cause, one failing finding: a missing node fails ``kvm.device``
    (with the fix) and the smoke test is skipped; any other open error
    fails ``kvm.smoke``."""
    if str(error.evidence.get("answer", "")).startswith("ENOENT"):
        found = [f for f in found if f.id != "kvm.device"]
        found.insert(0, _from_error("kvm.device", error))
        found.append(Finding("kvm.smoke", SKIP, "not run: there is no device to open"))
    else:
        found.append(_from_error("kvm.smoke", error))
    return found


def _guest_findings(result: SmokeResult, error: BoxliteError | None) -> list[Finding]:
    """The real-guest layers: hardware speed, a stock kernel's instructions, MSRs.

    The gate's error (one cause) rides on the finding of its layer; another
    layer that fails as a consequence of it fails without a fix of its own.
    """
    cause = error.cause if error is not None else ""
    evidence = result.as_dict()
    if result.step != STEP_DONE and not result.timed_out and error is not None:
        return [_from_error("guest.long_mode", error)]
    speed = result.speed
    if speed is None:
        speed_finding = Finding("guest.speed", SKIP, "not measured: the guest stopped first",
                                {"speed": None})  # fmt: skip
    elif speed.emulated:
        speed_finding = Finding("guest.speed", FAIL, "guest code is emulated in software: "
                                + speed.describe(), speed.as_dict())  # fmt: skip
    elif speed.emulated is None:
        speed_finding = Finding("guest.speed", SKIP, speed.describe(), speed.as_dict())
    else:
        speed_finding = Finding("guest.speed", PASS, "guest code runs at hardware speed: "
                                + speed.describe(), speed.as_dict())  # fmt: skip
    if result.ok:
        ran = ["64-bit long mode"] + [name for name, key in (
            ("lock cmpxchg16b", "cx16"), ("xsetbv, xsave64, xrstor64", "xsave"))
            if result.cpuid.get(key)]  # fmt: skip
        kernel_finding = Finding("guest.stock_kernel", PASS,
                                 f"a stock kernel's early code runs: {', '.join(ran)}",
                                 evidence)  # fmt: skip
    elif result.timed_out:
        kernel_finding = Finding("guest.stock_kernel", FAIL,
                                 f"the long-mode guest did not halt within {result.timeout:g} s",
                                 evidence)  # fmt: skip
    else:
        kernel_finding = Finding("guest.stock_kernel", FAIL, _stopped_at(result), evidence)
    msrs = result.msrs
    arch = msrs.get("arch_capabilities")
    if msrs.get("boot_msr_refused"):
        msr_finding = Finding("guest.msrs", FAIL,
                              f"KVM refuses the boot MSR {msrs['boot_msr_refused']}", msrs)
    elif isinstance(arch, dict) and not arch.get("accepted"):
        msr_finding = Finding(
            "guest.msrs", WARN,
            "ARCH_CAPABILITIES is offered in the supported CPUID but KVM refuses to set it",
            msrs, "QEMU with -cpu host aborts here ('failed to set MSR 0x10a'): give QEMU "
            "-cpu host,-arch-capabilities, or update the host kernel",
        )  # fmt: skip
    else:
        extra = ("; ARCH_CAPABILITIES offered and accepted" if isinstance(arch, dict)
                 else "; ARCH_CAPABILITIES not offered")  # fmt: skip
        msr_finding = Finding("guest.msrs", PASS,
                              f"the {len(BOOT_MSRS)} boot MSRs are accepted" + extra, msrs)
    findings = [speed_finding, kernel_finding, msr_finding]
    owner = {"guest-emulated": speed_finding, "guest-emulated-pvm": speed_finding,
             "msr-refused": msr_finding}.get(cause, kernel_finding)  # fmt: skip
    if error is not None:
        owner.status, owner.error, owner.fix = FAIL, error, error.fix
        owner.evidence = {"cause": cause, **owner.evidence}
    return findings


def _capabilities_finding(fd: int) -> Finding:
    caps = {
        "api_version": KVM_GET_API_VERSION,
        "max_vcpus": KVM_CAP_MAX_VCPUS,
        "recommended_vcpus": KVM_CAP_NR_VCPUS,
        "memory_slots": KVM_CAP_NR_MEMSLOTS,
        "user_memory": KVM_CAP_USER_MEMORY,
        "immediate_exit": KVM_CAP_IMMEDIATE_EXIT,
    }
    values: dict[str, object] = {}
    for name, number in caps.items():
        try:
            if name == "api_version":
                values[name] = _ioctl(fd, KVM_GET_API_VERSION)
            else:
                values[name] = _ioctl(fd, KVM_CHECK_EXTENSION, number)
        except OSError as err:
            values[name] = errno.errorcode.get(err.errno or 0, "error")
    missing = [n for n in ("user_memory", "immediate_exit") if values.get(n) in (0,)]
    summary = (f"API {values['api_version']}, up to {values['max_vcpus']} vCPUs, "
               f"{values['memory_slots']} memory slots")  # fmt: skip
    if missing:
        return Finding("kvm.capabilities", WARN, summary + f"; missing {', '.join(missing)}",
                       values, "VMMs need these capabilities: update the kernel")  # fmt: skip
    return Finding("kvm.capabilities", PASS, summary, values)


def _module_finding() -> Finding:
    modules = _kvm_modules()
    evidence: dict[str, object] = {"loaded": modules}
    for name in ("kvm_intel", "kvm_amd"):
        nested = _read_text(f"/sys/module/{name}/parameters/nested")
        if nested is not None:
            evidence[f"{name}.nested"] = nested.strip()
    if not modules:
        if not _exists("/sys/module"):
            return Finding("kvm.module", SKIP, "/sys/module is not available", evidence)
        return Finding("kvm.module", INFO, "no KVM module is loaded", evidence)
    arch = [m for m in modules if m != "kvm"] or modules
    if "kvm_pvm" in arch:
        native = _read_text("/sys/module/kvm_pvm/parameters/pvm_native")
        if native is not None:
            evidence["kvm_pvm.pvm_native"] = native.strip()
        return Finding("kvm.module", INFO,
                       "KVM module in use: kvm_pvm (paravirtual KVM without VT-x/AMD-V: "
                       "PVM-enabled guest kernels run at speed, other guests' kernel code "
                       "is emulated)", evidence)  # fmt: skip
    return Finding("kvm.module", INFO, f"KVM module in use: {', '.join(arch)}", evidence)


def _cpu_finding(kvm_works: bool, guest: SmokeResult | None = None) -> Finding:
    flags = _cpu_flags()
    if flags is None:
        return Finding("cpu.flags", SKIP, "/proc/cpuinfo lists no x86 flags")
    virt = sorted({"vmx", "svm"} & flags)
    evidence = {"vmx": "vmx" in flags, "svm": "svm" in flags, "hypervisor": "hypervisor" in flags}
    if virt:
        return Finding("cpu.flags", INFO, f"CPU flags: {', '.join(virt)}", evidence)
    where = "running under a hypervisor" if "hypervisor" in flags else "bare metal"
    if kvm_works and guest is not None and guest.emulated is False and guest.ok:
        return Finding("cpu.flags", INFO,
                       f"no vmx/svm flag ({where}), yet guest code runs at hardware speed: "
                       "flag-based checkers would wrongly refuse this host", evidence)  # fmt: skip
    if kvm_works and guest is not None and guest.emulated:
        return Finding("cpu.flags", INFO,
                       f"no vmx/svm flag ({where}): /dev/kvm works, but stock guests' kernel "
                       "code is emulated; flag-based checkers refuse this host for that "
                       "missing flag, which is the right verdict for the wrong reason",
                       evidence)  # fmt: skip
    return Finding("cpu.flags", INFO, f"no vmx/svm flag ({where})", evidence)


def _context_finding() -> Finding:
    """Where this process runs: container, cluster, user namespace, sandbox, LSM."""
    ev = _gather_evidence(context_only=True)
    parts = []
    if ev.contained:
        parts.append(f"{ev.contained} ({', '.join(ev.runtime_evidence) or 'environment'})")
    if ev.private_dev:
        parts.append("a private /dev (tmpfs)")
    if ev.in_userns:
        parts.append(f"a user namespace (uid_map {' '.join(str((ev.userns or {}).get('uid_map')).split())})")
    if ev.wsl:
        parts.append(f"WSL {ev.wsl}")
    sandbox = [name for name, _, _ in _policies(ev)]
    if sandbox:
        parts.append("sandboxed: " + ", ".join(sandbox))
    evidence = {
        "runtime": ev.runtime, "runtime_evidence": ev.runtime_evidence,
        "kubernetes": ev.kubernetes, "flatpak": ev.flatpak, "snap": ev.snap,
        "private_dev": ev.private_dev, "user_namespace": ev.userns, "wsl": ev.wsl,
        "no_new_privs": ev.no_new_privs, "seccomp": ev.seccomp,
        "landlock_abi": ev.landlock_abi, "lsm": ev.lsm, "lsm_context": ev.lsm_context,
    }  # fmt: skip
    if parts:
        return Finding("host.context", INFO, "running in " + "; ".join(parts), evidence)
    return Finding("host.context", INFO, "no container, user namespace, sandbox or WSL detected",
                   evidence)  # fmt: skip


class HvfProbe(HypervisorProbe):
    """macOS: Apple Silicon and Hypervisor.framework."""

    name = "hvf"

    def __init__(self, machine: str) -> None:
        self.machine = machine

    def __repr__(self) -> str:
        return f"HvfProbe({self.machine!r})"

    def _arch_error(self) -> BoxliteError | None:
        if self.machine == "arm64":
            return None
        try:
            translated = _sysctl_int("sysctl.proc_translated")
        except OSError:
            translated = None
        if translated == 1:
            return UnsupportedError(
                f"Unsupported architecture: {self.machine} Python running under Rosetta\n\n"
                "This Mac is Apple Silicon, but this interpreter is an x86_64 build "
                "translated by Rosetta, and Hypervisor.framework is not available to it.\n\n"
                "Fix: run an arm64 Python (a universal2 or arm64 build, started natively, "
                "e.g. `arch -arm64 python3`)",
                cause="rosetta", evidence={"machine": self.machine, "proc_translated": 1},
                fix="run an arm64 Python (e.g. `arch -arm64 python3`)",
            )  # fmt: skip
        return UnsupportedError(
            f"Unsupported architecture: {self.machine}\n\n"
            "BoxLite on macOS needs Apple Silicon (arm64); Intel Macs are not supported.\n\n"
            "Fix: use a Mac with Apple Silicon",
            cause="macos-not-arm64", evidence={"machine": self.machine},
            fix="use a Mac with Apple Silicon",
        )  # fmt: skip

    def _support_error(self) -> BoxliteError | None:
        tried = "read sysctl kern.hv_support (sysctlbyname)"
        try:
            support = _sysctl_int("kern.hv_support")
        except OSError as err:
            return _failure(
                UnsupportedError, "hv-support-unreadable",
                "Hypervisor.framework support cannot be read",
                tried=tried, answer=errno_name(err.errno or 0),
                fix="check by hand with `sysctl kern.hv_support`",
            )  # fmt: skip
        if support == 1:
            return None
        try:
            in_vm = _sysctl_int("kern.hv_vmm_present") == 1
        except OSError:
            in_vm = False
        answer = "kern.hv_support does not exist" if support is None else f"kern.hv_support = {support}"
        if in_vm:
            return _failure(
                UnsupportedError, "hv-in-vm",
                "Hypervisor.framework is not available: this Mac is itself a virtual "
                "machine without nested virtualization",
                tried=tried, answer=answer, vmm_present=1,
                fix="run on a physical Mac (macOS VMs get no nested virtualization "
                "before macOS 15 on M3 or later)",
            )  # fmt: skip
        return _failure(
            UnsupportedError, "hv-unsupported",
            "Hypervisor.framework is not available",
            tried=tried, answer=answer,
            fix="use macOS 11 or later on Apple Silicon; check with `sysctl kern.hv_support`",
        )  # fmt: skip

    def acquire(self, timeout: float = DEFAULT_TIMEOUT, backend: str | None = None,
                engine: str | None = DEFAULT_ENGINE) -> tuple[int | None, SmokeResult | None]:  # fmt: skip
        _check_engine(engine)
        error = self._arch_error() or self._support_error()
        if error is not None:
            raise error
        return None, None

    def diagnose_create_failure(self, error: BoxliteError) -> BoxliteError:
        """Refine an engine's VM-creation error.

        An engine runs Hypervisor.framework in its own signed helper, so a
        probe from this process proves something only when this process is
        entitled too: then hv_vm_create() is reproduced here.  Otherwise the
        engine's own hv_return_t is decoded from its message and host facts
        are reported, without claiming the engine's cause.
        """
        entitled = _hv_entitlement()
        if entitled:
            return self._probe_in_process(error)
        return self._decode_engine_code(error, entitled)

    def _decode_engine_code(self, error: BoxliteError, entitled: bool | None) -> BoxliteError:
        import re

        message = str(error)
        code = None
        for text in re.findall(r"0x[fF][aA][eE]94[0-9a-fA-F]{3}|-8537\d{4}", message):
            value = int(text, 0) & 0xFFFFFFFF
            if value in HV_RETURN_NAMES:
                code = value
                break
        facts = self._host_facts()
        why = ("this process is not entitled to Hypervisor.framework" if entitled is False
               else "this process's entitlements cannot be read")  # fmt: skip
        evidence: dict[str, object] = {"engine_message": message, "entitled": entitled, **facts}
        if code is None:
            return EngineError(
                f"{error.detail or message}\n\nNot probed here: {why}, so a probe from it "
                f"would answer HV_DENIED whatever the engine's cause.\nHost: "
                + ", ".join(f"{k} = {v}" for k, v in facts.items()),
                cause="hv-engine-error", evidence=evidence)  # fmt: skip
        name = HV_RETURN_NAMES[code]
        evidence["hv_return"] = name
        if code == HV_BUSY:
            return EngineError(
                f"{error.detail or message}\n\nThe engine's hv_vm_create returned HV_BUSY "
                f"({code:#x}): a VM already exists in that process (one per process). This is "
                "not a host problem: the engine created its VM twice.",
                cause="hv-busy", evidence=evidence)  # fmt: skip
        if code == HV_NO_RESOURCES:
            return ResourceExhaustedError(
                f"macOS Hypervisor.framework has no VM address space left: the engine's "
                f"hv_vm_create returned HV_NO_RESOURCES ({code:#x}); limit "
                f"kern.hv.max_address_spaces = {facts.get('kern.hv.max_address_spaces')}. Stop "
                "some boxes and retry",
                cause="hv-no-resources", evidence=evidence, fix="stop some boxes and retry")  # fmt: skip
        if code == HV_DENIED:
            return UnsupportedError(
                f"Hypervisor.framework access denied to the engine: its hv_vm_create returned "
                f"HV_DENIED ({code:#x}). The engine's helper lacks the {HV_ENTITLEMENT} "
                "entitlement (re-signing with `codesign --force --sign -` strips it); check "
                "with `codesign -d --entitlements - HELPER`",
                cause="hv-denied", evidence=evidence,
                fix=f"sign the engine's helper with the {HV_ENTITLEMENT} entitlement")  # fmt: skip
        return EngineError(
            f"{error.detail or message}\n\nThe engine's hv_vm_create returned {name} "
            f"({code:#x}).\nHost: " + ", ".join(f"{k} = {v}" for k, v in facts.items()),
            cause="hv-engine-code", evidence=evidence)  # fmt: skip

    def _host_facts(self) -> dict[str, object]:
        facts: dict[str, object] = {}
        for key in ("kern.hv_support", "kern.hv_vmm_present", "kern.hv.max_address_spaces",
                    "sysctl.proc_translated"):  # fmt: skip
            try:
                facts[key] = _sysctl_int(key)
            except OSError as err:
                facts[key] = errno_name(err.errno or 0)
        return facts

    def _probe_in_process(self, error: BoxliteError) -> BoxliteError:
        """Reproduce hv_vm_create() here to learn the code the engine discarded."""
        try:
            code = _hv_vm_create()
        except (OSError, AttributeError) as err:
            _log("debug", "HVF diagnostic unavailable: %s", err)
            return error
        name = HV_RETURN_NAMES.get(code, "unknown")
        if code == HV_SUCCESS:
            destroyed = _hv_vm_destroy()
            if destroyed != HV_SUCCESS:
                _log("error", "HVF diagnostic: hv_vm_destroy returned %#x", destroyed)
            _log("debug", "HVF diagnostic: hv_vm_create succeeded; the failure is elsewhere")
            return error
        if code == HV_BUSY:
            _log("debug", "HVF diagnostic: HV_BUSY, a VM exists; it failed after creation")
            return error
        _log("error", "HVF diagnostic: hv_vm_create returned %s (%#x)", name, code)
        if code == HV_NO_RESOURCES:
            return ResourceExhaustedError(
                "macOS Hypervisor.framework has no VM address space left "
                "(kern.hv.max_address_spaces reached): hv_vm_create returned "
                f"HV_NO_RESOURCES ({code:#x}). Stop some boxes and retry; see "
                "`sysctl kern.hv.max_address_spaces`",
                cause="hv-no-resources", evidence={"hv_return": name},
                fix="stop some boxes and retry",
            )  # fmt: skip
        if code == HV_DENIED:
            return UnsupportedError(
                f"Hypervisor.framework access denied: hv_vm_create returned HV_DENIED "
                f"({code:#x}). The process {sys.executable} lacks the "
                "com.apple.security.hypervisor entitlement; sign it with that entitlement",
                cause="hv-denied", evidence={"hv_return": name, "executable": sys.executable},
                fix="sign the executable with the com.apple.security.hypervisor entitlement",
            )  # fmt: skip
        if code == HV_UNSUPPORTED:
            return UnsupportedError(
                f"Hypervisor.framework has no hypervisor for this process: hv_vm_create "
                f"returned HV_UNSUPPORTED ({code:#x}), e.g. inside a VM without nested "
                "virtualization",
                cause="hv-unsupported-code", evidence={"hv_return": name},
                fix="run on a physical Apple Silicon Mac",
            )  # fmt: skip
        return EngineError(
            f"{error}. The HVF diagnostic hv_vm_create returned {name} ({code:#x})",
            cause="hv-other", evidence={"hv_return": f"{code:#x}"},
        )

    def findings(self, timeout: float, backend: str | None, probe_hvf: bool,
                 engine: str | None = DEFAULT_ENGINE) -> list[Finding]:  # fmt: skip
        found: list[Finding] = []
        arch = self._arch_error()
        if arch is not None:
            found.append(_from_error("macos.arch", arch))
        else:
            found.append(Finding("macos.arch", PASS, "Apple Silicon, native arm64 Python",
                                 {"machine": self.machine}))  # fmt: skip
        support = self._support_error()
        found.append(_from_error("macos.hv_support", support) if support else
                     Finding("macos.hv_support", PASS, "kern.hv_support = 1"))  # fmt: skip
        for name, key in (("kern.hv_vmm_present", "macos.vmm_present"),
                          ("kern.hv.max_address_spaces", "macos.max_address_spaces")):  # fmt: skip
            try:
                value = _sysctl_int(name)
            except OSError as err:
                found.append(Finding(key, SKIP, f"{name} unreadable: {errno_name(err.errno or 0)}"))
                continue
            if value is None:
                found.append(Finding(key, SKIP, f"{name} does not exist on this macOS"))
            else:
                found.append(Finding(key, INFO, f"{name} = {value}", {name: value}))
        if probe_hvf:
            _timed(found, self._hvf_finding)
        return found

    def _hvf_finding(self) -> Finding:
        try:
            code = _hv_vm_create()
        except (OSError, AttributeError) as err:
            return Finding("macos.hv_vm_create", SKIP, f"Hypervisor.framework not loadable: {err}")
        name = HV_RETURN_NAMES.get(code, f"{code:#x}")
        evidence = {"hv_return": name}
        if code == HV_SUCCESS:
            destroyed = _hv_vm_destroy()
            evidence["hv_vm_destroy"] = HV_RETURN_NAMES.get(destroyed, f"{destroyed:#x}")
            return Finding("macos.hv_vm_create", PASS, "hv_vm_create succeeded", evidence)
        if code == HV_DENIED:
            return Finding("macos.hv_vm_create", INFO,
                           f"this process ({sys.executable}) is not entitled to "
                           "Hypervisor.framework (HV_DENIED); a signed VMM would be",
                           evidence)  # fmt: skip
        return Finding("macos.hv_vm_create", FAIL, f"hv_vm_create returned {name}", evidence)


# ── Platform dispatch ───────────────────────────────────────────────────────


def _check_engine(engine: str | None) -> None:
    if engine is not None and engine not in ENGINES:
        raise InvalidArgumentError(
            f"engine must be one of {', '.join(ENGINES)} or None, got {engine!r}")


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


class SystemCheck:
    """Proof that the host passed its checks.

    On Linux it holds the validated /dev/kvm descriptor (read-write,
    close-on-exec) until ``close()`` or the end of a ``with`` block.
    """

    def __init__(self, fd: int | None, smoke: SmokeResult | None, probe: HypervisorProbe) -> None:
        self._fd = fd
        self.smoke = smoke
        self.probe = probe

    @classmethod
    def run(cls, *, timeout: float = DEFAULT_TIMEOUT, backend: str | None = None,
            engine: str | None = DEFAULT_ENGINE) -> SystemCheck:  # fmt: skip
        """Verify the host; raise a BoxliteError with the cause and fix if it fails.

        ``engine`` ("libkrun", BoxLite's engine, by default) asks whether a
        real guest of that engine can run: a 64-bit guest runs a stock
        kernel's early instructions at hardware speed, with the MSRs a
        direct-boot VMM sets.  ``engine=None`` is the bare device check:
        /dev/kvm opens, speaks API 12, creates a VM and runs a trivial guest.
        """
        fd, smoke = _PROBE.acquire(timeout, backend, engine)
        return cls(fd, smoke, _PROBE)

    @property
    def smoke_tested(self) -> bool:
        """Whether real guest code ran (False where no smoke test exists yet)."""
        return self.smoke is not None and self.smoke.ok

    def fileno(self) -> int:
        """The open /dev/kvm descriptor; raises ValueError when there is none."""
        if self._fd is None:
            raise ValueError("no KVM descriptor (closed, or not Linux)")
        return self._fd

    def close(self) -> None:
        """Release the descriptor; safe to call more than once."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else f"fd {self._fd}"
        return f"<SystemCheck {self.describe()}; {state}>"

    def __enter__(self) -> SystemCheck:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def describe(self) -> str:
        """One line on what was proven."""
        if self.smoke is not None and self.smoke.speed is not None:
            return (f"usable: a 64-bit guest ran a stock kernel's early instructions at "
                    f"hardware speed ({self.smoke.speed.describe()}; {self.smoke.backend} "
                    f"backend, {self.smoke.elapsed * 1e3:.2f} ms)")  # fmt: skip
        if self.smoke is not None and self.smoke.guest == "aarch64":
            return (f"usable: KVM ran arm64 guest code and it wrote its proof value by MMIO "
                    f"({self.smoke.backend} backend, {self.smoke.elapsed * 1e3:.2f} ms)")
        if self.smoke is not None:
            return (f"usable: KVM ran guest code and it halted ({self.smoke.backend} backend, "
                    f"{self.smoke.elapsed * 1e3:.2f} ms)")  # fmt: skip
        if isinstance(self.probe, KvmProbe):
            return (f"usable, not smoke-tested: {self.probe.path} opens read-write, but no "
                    f"guest code was run (no smoke test for {self.probe.machine} yet)")  # fmt: skip
        return "usable: Hypervisor.framework is available"


USABLE, USABLE_WITH_WARNINGS, NOT_USABLE = "usable", "usable-with-warnings", "not-usable"
SCHEMA_VERSION = 2


class Report:
    """The result of ``check()``: verdict, the error, findings and host facts."""

    def __init__(self, findings: list[Finding], error: BoxliteError | None,
                 host: dict[str, object]) -> None:  # fmt: skip
        self.findings = findings
        self.error = error
        self.host = host

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
    def engines(self) -> dict[str, object]:
        """Each engine's verdict, by name (empty when none were checked)."""
        return {f.id.split(".", 1)[1]: f.evidence for f in self.findings
                if f.id.startswith("engine.")}  # fmt: skip

    def as_dict(self) -> dict[str, object]:
        error = None
        if self.error is not None:
            err = self.error
            message = str(err)
            if err.fix and message.endswith("Fix: " + err.fix):  # said once, in "fix"
                message = message[: -len("Fix: " + err.fix)].rstrip()
            error = {"type": type(err).__name__, "code": err.code, "cause": err.cause,
                     "summary": err.summary, "message": message,
                     "evidence": err.evidence, "fix": err.fix}  # fmt: skip
        return {
            "schema_version": SCHEMA_VERSION,
            "checker_version": __version__,
            "verdict": self.verdict,
            "host": self.host,
            "error": error,
            "engines": self.engines,
            "findings": [f.as_dict() for f in self.findings],
        }


def _host_facts(probe: HypervisorProbe, findings: Sequence[Finding] = ()) -> dict[str, object]:
    uname = os.uname()
    native, note = native_backend() if isinstance(probe, KvmProbe) else (False, "")
    ran = next((f.evidence.get("backend") for f in findings if f.id == "kvm.smoke"), None)
    return {
        "host": uname.nodename,
        "system": uname.sysname,
        "kernel": uname.release,
        "machine": uname.machine,
        "python": sys.version.split()[0],
        "probe": probe.name,
        # The backend that ran, else the one that would run.
        "smoke_backend": ran or (("native" if native else "python")
                                 if isinstance(probe, KvmProbe) else None),
        "native_library": note or None,
        "kvm_provider": _kvm_provider() if isinstance(probe, KvmProbe) else None,
    }


def check(
    *, timeout: float = DEFAULT_TIMEOUT, backend: str | None = None, probe_hvf: bool = False,
    engine: str | None = DEFAULT_ENGINE,
) -> Report:
    """Run every probe and return a Report; never raises for a host problem.

    The layers are reported apart: the device works (``kvm.smoke``), guest
    code runs at hardware speed (``guest.speed``), a stock kernel's early
    instructions run (``guest.stock_kernel``), the boot MSRs are accepted
    (``guest.msrs``).  The verdict follows ``engine`` as SystemCheck.run()
    does; with ``engine=None`` only the device layer is checked.
    """
    _check_timeout(timeout)
    probe = _PROBE
    findings = probe.findings(timeout, backend, probe_hvf, engine)
    error = next((f.error for f in findings if f.error is not None), None)
    host = _host_facts(probe, findings)
    host["engine"] = engine
    return Report(findings, error, host)


# ── Command line ────────────────────────────────────────────────────────────

EXIT_USABLE, EXIT_NOT_USABLE, EXIT_USAGE, EXIT_CHECKER_FAILED = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 128 + 13  # what a tool killed by SIGPIPE reports

_COLOURS = {PASS: "32", WARN: "33", FAIL: "31", SKIP: "2", INFO: "36"}


def _paint(text: str, status: str, colour: bool) -> str:
    return f"\x1b[{_COLOURS[status]}m{text}\x1b[0m" if colour else text


def _render(report: Report, *, quiet: bool, colour: bool, prog: str = "boxlite_syscheck") -> str:
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
    fixes = [f for f in shown
             if f.fix and f.status in (FAIL, WARN) and f.error is None and f.fix != said]  # fmt: skip
    if fixes:
        lines += ["", "How to fix:"]
        lines += [f"  {f.id}: {f.fix}" for f in fixes]
    if report.error is not None:
        lines += ["", str(report.error)]
    if not quiet:
        lines += ["", f"Verdict: {report.verdict}"]
    return "\n".join(lines)


def _label_value(text: object) -> str:
    """A Prometheus label value, escaped (text exposition format 0.0.4)."""
    return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _prometheus(report: Report, duration_s: float) -> str:
    """The node_exporter textfile-collector format."""
    engine = report.host.get("engine") or "none"
    error = report.error
    lines = [
        "# HELP boxlite_syscheck_usable Whether this host can run the selected engine's "
        "real guests (1) or not (0).",
        "# TYPE boxlite_syscheck_usable gauge",
        f'boxlite_syscheck_usable{{engine="{_label_value(engine)}"}} '
        f"{0 if report.verdict == NOT_USABLE else 1}",
    ]
    if report.engines:
        lines += ["# HELP boxlite_syscheck_engine_would_run Whether each engine would start "
                  "and run a stock guest here (1) or not (0).",
                  "# TYPE boxlite_syscheck_engine_would_run gauge"]
        for name, verdict in report.engines.items():
            assert isinstance(verdict, dict)
            lines.append(f'boxlite_syscheck_engine_would_run{{engine="{_label_value(name)}",'
                         f'verdict="{_label_value(verdict["verdict"])}"}} '
                         f'{1 if verdict["verdict"] == WOULD_RUN else 0}')  # fmt: skip
    lines += [
        "# HELP boxlite_syscheck_check_duration_seconds How long the check took.",
        "# TYPE boxlite_syscheck_check_duration_seconds gauge",
        f"boxlite_syscheck_check_duration_seconds {duration_s:.6f}",
        "# HELP boxlite_syscheck_info The verdict and its cause, as labels.",
        "# TYPE boxlite_syscheck_info gauge",
        f'boxlite_syscheck_info{{version="{__version__}",verdict="{report.verdict}",'
        f'cause="{_label_value(error.cause if error else "")}",'
        f'kernel="{_label_value(report.host.get("kernel", ""))}",'
        f'kvm_provider="{_label_value(report.host.get("kvm_provider", ""))}"}} 1',
    ]
    return "\n".join(lines)


def _nfd_value(text: object) -> str:
    """A Kubernetes label value: [A-Za-z0-9][-A-Za-z0-9_.]*[A-Za-z0-9], at most 63."""
    import re

    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-_.")[:63].strip("-_.")
    return value


def _nfd(report: Report) -> str:
    """A Node Feature Discovery local feature file (features.d): one label a line.

    Names without a prefix get NFD's feature.node.kubernetes.io/ namespace.
    """
    usable = report.verdict != NOT_USABLE
    labels = {
        "boxlite-kvm-usable": "true" if usable else "false",
        "boxlite-kvm-engine": report.host.get("engine") or "none",
        "boxlite-kvm-cause": report.error.cause if report.error is not None else "none",
        "boxlite-kvm-provider": report.host.get("kvm_provider") or "none",
    }
    for name, verdict in report.engines.items():
        assert isinstance(verdict, dict)
        labels[f"boxlite-kvm-{name}"] = "true" if verdict["verdict"] == WOULD_RUN else "false"
    return "\n".join(f"{key}={_nfd_value(value)}" for key, value in labels.items())


def _prog() -> str:
    """The name this command was run by, for usage lines and messages."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "boxlite-syscheck" if name == "boxlite-syscheck" else "boxlite_syscheck"


def _colour_wanted() -> bool:
    """Colour only on a terminal, never with a non-empty NO_COLOR or TERM=dumb."""
    return (sys.stdout.isatty() and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check from the command line; return the exit code."""
    import argparse
    import time

    prog = _prog()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Check that this host can run hardware-accelerated VMs, by running "
        "real guest code under KVM (Linux) or asking Hypervisor.framework (macOS).",
        epilog="Exit codes: 0 usable, 1 not usable, 2 usage error, 3 the checker failed, "
        "141 standard output closed.",
    )
    parser.add_argument("--format", choices=("text", "json", "prometheus", "nfd"),
                        default="text", help="text (default), json, prometheus "
                        "(node_exporter textfile) or nfd (Node Feature Discovery features.d)")  # fmt: skip
    parser.add_argument("--json", action="store_const", const="json", dest="format",
                        help="the same as --format json")  # fmt: skip
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="text: print only failures and warnings")  # fmt: skip
    parser.add_argument("--strict", action="store_true", help="count warnings as failure")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"bound on running the guest (default {DEFAULT_TIMEOUT:g})")  # fmt: skip
    parser.add_argument("--backend", choices=("native", "python"),
                        help="force a smoke-test backend (default: native if built)")  # fmt: skip
    parser.add_argument("--engine", choices=(*ENGINES, "none"), default=DEFAULT_ENGINE,
                        help="whose real guest must run (default: libkrun, BoxLite's "
                        "engine); 'none' checks only that the device works")  # fmt: skip
    parser.add_argument("--probe-hvf", action="store_true",
                        help="macOS: also call hv_vm_create() and hv_vm_destroy()")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse exits on --help, --version and errors
        return EXIT_USAGE if stop.code not in (0, None) else EXIT_USABLE
    if args.quiet and args.format != "text":
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: --quiet applies to the text report only", file=sys.stderr)
        return EXIT_USAGE
    try:
        _check_timeout(args.timeout)
    except InvalidArgumentError as err:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: --timeout: {err.detail}", file=sys.stderr)
        return EXIT_USAGE
    if args.probe_hvf and not isinstance(_PROBE, HvfProbe):
        print(f"{prog}: note: --probe-hvf applies to macOS only; ignored here", file=sys.stderr)
    started = time.perf_counter()
    try:
        engine = None if args.engine == "none" else args.engine
        report = check(timeout=args.timeout, backend=args.backend, probe_hvf=args.probe_hvf,
                       engine=engine)  # fmt: skip
    except InternalError as err:
        print(f"{prog}: the checker failed: {err}", file=sys.stderr)
        if err.fix:
            print(f"{prog}: fix: {err.fix}", file=sys.stderr)
        return EXIT_CHECKER_FAILED
    except Exception as err:  # a bug here must not look like a host verdict
        print(f"{prog}: the checker failed: {type(err).__name__}: {err}",
              file=sys.stderr)  # fmt: skip
        return EXIT_CHECKER_FAILED
    duration_s = time.perf_counter() - started
    verdict = report.verdict
    failed = verdict == NOT_USABLE or (args.strict and verdict == USABLE_WITH_WARNINGS)
    try:
        if args.format == "json":
            import json

            print(json.dumps(report.as_dict(), indent=2, default=str))
        elif args.format == "prometheus":
            print(_prometheus(report, duration_s))
        elif args.format == "nfd":
            print(_nfd(report))
        else:
            text = _render(report, quiet=args.quiet, colour=_colour_wanted(), prog=prog)
            if text:
                print(text)
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
    if failed and verdict == USABLE_WITH_WARNINGS:
        print(f"{prog}: --strict: warnings count as not usable", file=sys.stderr)
    return EXIT_NOT_USABLE if failed else EXIT_USABLE


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
