"""Per-engine verdicts: requirements as data, probed on this host for real."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess

import pytest
from conftest import (
    CHECK_EVERY_DOOR,
    SECCOMP_INSTALL,
    diagnose,
    every_door_agrees,
    needs_kvm,
    needs_root,
    on_pvm_host,
)

import boxlite_syscheck as b
from boxlite_syscheck import _layer

# ── The table ───────────────────────────────────────────────────────────────


def test_every_capability_in_the_table_has_a_number():
    for engine, row in b.ENGINE_REQUIREMENTS.items():
        for kind in ("required", "optional"):
            for arch, names in row[kind].items():
                assert arch in ("x86_64", "aarch64"), (engine, arch)
                for name in names:
                    assert name in b.KVM_CAPS, (engine, name)
        assert set(row["ioctls"]) <= {
            "KVM_SET_TSS_ADDR",
            "KVM_SET_IDENTITY_MAP_ADDR",
            "KVM_CREATE_IRQCHIP",
            "KVM_CREATE_PIT2",
            "KVM_ENABLE_CAP(SPLIT_IRQCHIP)",
        }


def test_the_capability_numbers_are_the_kernels(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler is needed to read <linux/kvm.h>")
    # Capabilities newer than the installed headers are skipped there.
    lines = "".join(
        f'\n#ifdef KVM_CAP_{n}\nprintf("{n} %d\\n", KVM_CAP_{n});\n#endif\n' for n in b.KVM_CAPS
    )
    ioctls = "".join(
        f'printf("{n} %lu\\n", (unsigned long){n});'
        for n in (
            "KVM_SET_TSS_ADDR",
            "KVM_SET_IDENTITY_MAP_ADDR",
            "KVM_CREATE_IRQCHIP",
            "KVM_CREATE_PIT2",
            "KVM_ENABLE_CAP",
            "KVM_GET_SUPPORTED_CPUID",
            "KVM_SET_CPUID2",
            "KVM_GET_MSR_INDEX_LIST",
            "KVM_GET_MSR_FEATURE_INDEX_LIST",
            "KVM_GET_MSRS",
            "KVM_SET_MSRS",
        )
    )
    source = tmp_path / "caps.c"
    source.write_text(
        "#include <stdio.h>\n#include <linux/kvm.h>\nint main(void){"
        + lines
        + ioctls
        + "return 0;}\n"
    )
    subprocess.run([cc, "-o", str(tmp_path / "caps"), str(source)], check=True)
    out = subprocess.run([str(tmp_path / "caps")], capture_output=True, text=True, check=True)
    values = {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines())}
    checked = [name for name in b.KVM_CAPS if name in values]
    assert len(checked) >= len(b.KVM_CAPS) - 2, sorted(set(b.KVM_CAPS) - set(values))
    for name in checked:
        assert values[name] == b.KVM_CAPS[name], name
    for name in (
        "KVM_SET_TSS_ADDR",
        "KVM_SET_IDENTITY_MAP_ADDR",
        "KVM_CREATE_IRQCHIP",
        "KVM_CREATE_PIT2",
        "KVM_ENABLE_CAP",
        "KVM_GET_SUPPORTED_CPUID",
        "KVM_SET_CPUID2",
        "KVM_GET_MSR_INDEX_LIST",
        "KVM_GET_MSR_FEATURE_INDEX_LIST",
        "KVM_GET_MSRS",
        "KVM_SET_MSRS",
    ):
        assert values[name] == getattr(b, name), name


# ── The decoder, on the messages users see (engine-requirements.md) ─────────


@pytest.mark.parametrize(
    "message, expected",
    [
        ("Missing KVM capabilities: [0x24]", ["KVM_CAP_IOEVENTFD (36) is missing"]),
        (
            "Missing KVM capabilities: [0x4, 0x21]",
            ["KVM_CAP_SET_TSS_ADDR (4) is missing", "KVM_CAP_PIT2 (33) is missing"],
        ),
        ("Missing KVM capabilities: SetTssAddr", ["KVM_CAP_SET_TSS_ADDR (4) is missing"]),
        ("Error creating the Kvm object: Error(13)", ["errno 13 is EACCES (Permission denied)"]),
        ("thread 'main' panicked: Capability missing: Irqchip", ["KVM_CAP_IRQCHIP (0) is missing"]),
        (
            "VmCreate(No such file or directory (os error 2))",
            ["errno 2 is ENOENT (No such file or directory)"],
        ),
        ("VmBoot(KvmNew(Error(13)))", ["errno 13 is EACCES (Permission denied)"]),
        (
            "ioctl(KVM_CREATE_VM) failed: 16 Device or resource busy",
            ["errno 16 is EBUSY (Device or resource busy)"],
        ),
        ("kvm does not support KVM_CAP_SET_TSS_ADDR", ["KVM_CAP_SET_TSS_ADDR (4) is missing"]),
        (
            "missing required hypervisor capability ImmediateExit",
            ["KVM_CAP_IMMEDIATE_EXIT (136) is missing"],
        ),
        (
            "VmFd(Os { code: 16, kind: ResourceBusy })",
            ["errno 16 is EBUSY (Device or resource busy)"],
        ),
        ("the guest exited", []),
    ],
)
def test_decoder(message, expected):
    assert b.decode_engine_message(message) == expected


# ── On this host ────────────────────────────────────────────────────────────


@on_pvm_host
def test_here_every_engine_would_start_but_its_guest_would_fail():
    report = b.check()
    assert set(report.engines) == set(b.ENGINES)
    for name, verdict in report.engines.items():
        assert verdict["verdict"] == b.WOULD_FAIL_GUEST, (name, verdict)
        assert verdict["missing_capabilities"] == [] and verdict["failed_ioctls"] == {}
        assert verdict["cause"] == "guest-emulated-pvm"
    statuses = {f.id: f.status for f in report.findings if f.id.startswith("engine.")}
    assert statuses.pop("engine.libkrun") == "fail"  # the selected engine decides
    assert set(statuses.values()) == {"info"}
    b._wait_for_closes()


@on_pvm_host
@pytest.mark.parametrize("engine", b.ENGINES)
def test_the_cli_follows_the_engine(engine, capsys):
    assert b.main(["--engine", engine, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["host"]["engine"] == engine
    assert report["engines"][engine]["verdict"] == b.WOULD_FAIL_GUEST
    b._wait_for_closes()


FILTERED_SCRIPT = (
    SECCOMP_INSTALL
    + r"""
import sys
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
ENGINE = "libkrun"
b.check()  # load everything before the filter
b._wait_for_closes()
_install_seccomp(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
report = b.check()
engines = {n: [v["verdict"], [c["number"] for c in v["missing_capabilities"]], v["failed_ioctls"]]
           for n, v in report.engines.items()}
"""
    + CHECK_EVERY_DOOR.replace(
        "print(json.dumps(out))", "out['engines'] = engines\nprint(json.dumps(out))"
    )
)


@needs_root
def test_a_capability_made_missing_stops_exactly_the_engines_that_need_it(run_json):
    # KVM_CHECK_EXTENSION(SET_TSS_ADDR) answers 0, "not supported".
    out = run_json(
        FILTERED_SCRIPT, str(b.KVM_CHECK_EXTENSION), "0", str(b.KVM_CAPS["SET_TSS_ADDR"])
    )
    every_door_agrees(out)
    for name, row in b.ENGINE_REQUIREMENTS.items():
        verdict, numbers, _ = out["engines"][name]
        if "SET_TSS_ADDR" in row["required"]["x86_64"]:
            assert verdict == b.WOULD_NOT_START and numbers == [4], (name, verdict)
        else:
            assert verdict != b.WOULD_NOT_START and numbers == [], (name, verdict)
    for backend in ("native", "python"):
        assert out[backend]["cause"] == "kvm-capability-missing"
        assert "KVM_CAP_SET_TSS_ADDR (4)" in out[backend]["message"]
        # Two causes fit (a filter can answer it): both said, checks in order.
        assert "seccomp filter" in out[backend]["message"]
        assert "check in this order" in out[backend]["fix"]


@needs_root
def test_a_failing_startup_ioctl_stops_the_engines_that_issue_it(run_json):
    out = run_json(FILTERED_SCRIPT, str(b.KVM_CREATE_IRQCHIP), str(errno.EPERM), "-1")
    every_door_agrees(out)
    for name, row in b.ENGINE_REQUIREMENTS.items():
        verdict, _, failed = out["engines"][name]
        if "KVM_CREATE_IRQCHIP" in row["ioctls"]:
            assert verdict == b.WOULD_NOT_START and failed == {"KVM_CREATE_IRQCHIP": "EPERM"}
        else:
            assert failed == {}, name
    # The gate issues the engine's start-up ioctls too, so it says the same:
    # EPERM from a seccomp filter, on an ioctl.
    assert out["native"]["cause"] == "kvm-seccomp-denied"
    assert "an ioctl on /dev/kvm" in out["python"]["message"]
    assert "create the in-kernel irqchip (KVM_CREATE_IRQCHIP)" in out["python"]["message"]


def capability_facts(engine, values, **evidence):
    ev = b.Evidence(gather=False, kernel="6.1.0", kvm_provider="kvm_amd", **evidence)
    facts = b.Facts("linux", "x86_64", engine=engine, evidence=ev)
    facts.caps = values
    return facts


def test_a_missing_capability_without_seccomp_says_update_the_kernel():
    facts = capability_facts("crosvm", {"IMMEDIATE_EXIT": 0}, seccomp="0")
    error = b._diagnose(facts)
    assert error.cause == "kvm-capability-missing" and _layer(error) == "engine"
    assert "KVM_CAP_IMMEDIATE_EXIT (136)" in str(error) and "update the host kernel" in error.fix
    under_seccomp = b._diagnose(capability_facts("crosvm", {"IMMEDIATE_EXIT": 0}, seccomp="2"))
    assert (
        under_seccomp.cause == "kvm-capability-missing"
        and "check in this order" in under_seccomp.fix
    )


def test_a_capability_the_engine_does_not_need_is_not_its_cause():
    facts = capability_facts(
        "libkrun",
        {
            "IMMEDIATE_EXIT": 0,
            **dict.fromkeys(b.ENGINE_REQUIREMENTS["libkrun"]["required"]["x86_64"], 1),
        },
        seccomp="0",
    )
    assert b._diagnose(facts) is None


def test_qemu_alone_refuses_an_arch_capabilities_that_kvm_will_not_set():
    result = b.SmokeResult("python", guest="long-mode")
    result.step, result.exit_reason, result.proof, result.stage = b.STEP_DONE, 5, b.PROOF_VALUE, 7
    result.cpuid = {"cx16": False, "xsave": False, "arch_capabilities": True}
    result.speed = b.Speed(1.0, 1.0, 1024)
    result.msrs = {
        "boot_msrs_set": 10,
        "boot_msr_refused": None,
        "arch_capabilities": {"accepted": False, "value": "0x69"},
    }
    facts = capability_facts("libkrun", dict.fromkeys(b.KVM_CAPS, 1), seccomp="0")
    facts.smoke = result
    verdicts = {f.id: f.evidence for f in b._engine_findings(facts, b._diagnose_staged(facts))}
    assert verdicts["engine.qemu"]["verdict"] == b.WOULD_NOT_START
    assert "-cpu host" in verdicts["engine.qemu"]["why"]
    assert verdicts["engine.firecracker"]["verdict"] == b.WOULD_RUN
    assert diagnose(result, engine="libkrun") is None
    assert diagnose(result, engine="qemu").cause == "msr-arch-capabilities-refused"


@needs_kvm
@pytest.mark.parametrize("engine", b.ENGINES)
def test_each_engines_own_start_up_sequence_works_here(kvm_fd, engine):
    """Each engine's start-up ioctls, made as it makes them, all work on a
    KVM that takes every one of them alone: a sequence that fails here
    would call the engine "would not start" on every host (crosvm's PIT
    was once asked for on a VM without the irqchip it needs: ENOENT)."""
    names = b.ENGINE_REQUIREMENTS[engine]["ioctls"]
    assert b._probe_startup_ioctls(kvm_fd, names) == dict.fromkeys(names, 0)
    b._wait_for_closes()


@needs_kvm
def test_startup_ioctls_all_work_here(kvm_fd):
    assert b._probe_startup_ioctls(kvm_fd, b._STARTUP_STEPS) == dict.fromkeys(
        [
            "KVM_SET_IDENTITY_MAP_ADDR",
            "KVM_SET_TSS_ADDR",
            "KVM_CREATE_IRQCHIP",
            "KVM_CREATE_PIT2",
            "KVM_ENABLE_CAP(SPLIT_IRQCHIP)",
        ],
        0,
    )
    b._wait_for_closes()
