"""Linux: evidence in, one cause out; and the seams the evidence is read through."""

from __future__ import annotations

import errno
import io
import os

import pytest
from conftest import KVM_NODE, evidence

import boxlite_syscheck as b


def facts(ev, *, open_errno=None, step=None, err=0, engine=None, machine="x86_64", **smoke):
    f = b.Facts("linux", machine, engine=engine, evidence=ev)
    f.open_errno = open_errno
    if step is not None or smoke:
        f.smoke = b.SmokeResult("native", timeout=2.0)
        f.smoke.step, f.smoke.error, f.smoke.api_version = (
            (b.STEP_DONE if step is None else step),
            err,
            12,
        )
        for key, value in smoke.items():
            setattr(f.smoke, key, value)
    return f


def cause_of(f):
    error = b._diagnose(f)
    return None if error is None else error.cause


class TestMissingDevice:
    @pytest.mark.parametrize(
        ("flags", "vendor", "module"),
        [({"vmx"}, "GenuineIntel", "kvm_intel"), ({"svm"}, "AuthenticAMD", "kvm_amd")],
    )
    def test_module_not_loaded(self, flags, vendor, module):
        error = b._diagnose(
            facts(evidence(node=None, cpu_flags=flags, vendor=vendor), open_errno=errno.ENOENT)
        )
        assert isinstance(error, b.UnsupportedError)
        assert error.cause == "kvm-module-not-loaded"
        assert f"modprobe {module}" in error.fix
        assert "ENOENT (No such file or directory)" in str(error)

    def test_vm_without_nested_virtualization(self):
        ev = evidence(node=None, cpu_flags={"hypervisor"}, vendor="AuthenticAMD")
        error = b._diagnose(facts(ev, open_errno=errno.ENOENT))
        assert error.cause == "kvm-no-nested" and "nested virtualization" in error.fix

    def test_no_virtualization_in_cpu(self):
        error = b._diagnose(facts(evidence(node=None, cpu_flags={"sse"}), open_errno=errno.ENOENT))
        assert error.cause == "kvm-no-virtualization" and "BIOS/UEFI" in error.fix

    def test_module_loaded_but_no_node(self):
        ev = evidence(node=None, kvm_modules=["kvm_intel", "kvm"])
        error = b._diagnose(facts(ev, open_errno=errno.ENOENT))
        assert error.cause == "kvm-node-missing"
        assert "mknod /dev/kvm c 10 232" in error.fix and "kvm_intel is loaded" in error.summary

    def test_wsl2(self):
        error = b._diagnose(facts(evidence(node=None, wsl="2"), open_errno=errno.ENOENT))
        assert error.cause == "kvm-missing-wsl"
        assert "Windows 11" in error.fix and "nestedVirtualization=true" in error.fix
        assert "wsl --shutdown" in error.fix

    @pytest.mark.parametrize(
        ("runtime", "fix"),
        [
            ("podman", "--device /dev/kvm"),
            ("docker", "--device /dev/kvm"),
            ("kubernetes", "devices.kubevirt.io/kvm"),
            ("firejail", "--ignore=private-dev"),
            ("bubblewrap", "--dev-bind /dev/kvm /dev/kvm"),
            ("lxc", "lxc config device add"),
            ("systemd-nspawn", "--bind=/dev/kvm"),
            ("flatpak", "flatpak override --device=kvm"),
        ],
    )
    def test_each_runtime_gets_its_own_way_to_pass_the_device_in(self, runtime, fix):
        error = b._diagnose(facts(evidence(node=None, runtime=runtime), open_errno=errno.ENOENT))
        assert error.cause == "kvm-missing-container"
        assert fix in error.fix and "mknod" not in error.fix  # never create one inside
        if runtime in ("firejail", "bubblewrap", "flatpak"):
            assert "--device /dev/kvm" not in error.fix  # Docker's advice is not theirs


class TestAccessDenied:
    def test_not_in_group(self):
        error = b._diagnose(facts(evidence(), open_errno=errno.EACCES))
        assert error.cause == "kvm-not-in-group"
        assert "usermod -aG kvm alice" in error.fix and "does not pick up new groups" in error.fix

    def test_stale_session(self):
        error = b._diagnose(facts(evidence(group_listed=True), open_errno=errno.EACCES))
        assert error.cause == "kvm-stale-session"
        assert "log out and back in" in error.fix and "usermod" not in error.fix

    def test_mode_without_group_access(self):
        ev = evidence(node={**KVM_NODE, "mode": 0o600})
        error = b._diagnose(facts(ev, open_errno=errno.EACCES))
        assert error.cause == "kvm-mode-no-group" and "0600" in str(error)
        assert "/etc/udev/rules.d/65-kvm.rules" in error.fix
        assert "udevadm control --reload" in error.fix
        assert "udevadm trigger --name-match=kvm" in error.fix
        assert "usermod -aG kvm" in error.fix and "groupadd" not in error.fix

    def test_mode_without_group_access_on_a_host_without_a_kvm_group(self):
        ev = evidence(node={**KVM_NODE, "mode": 0o600}, kvm_group=False)
        assert b._diagnose(facts(ev, open_errno=errno.EACCES)).fix.startswith(
            "`sudo groupadd --system kvm`"
        )

    def test_a_group_without_a_name_is_created_not_usermodded(self):
        ev = evidence(
            user="nobody",
            euid=65534,
            groups=(65534,),
            node={**KVM_NODE, "group": None},
            group_named=False,
        )
        error = b._diagnose(facts(ev, open_errno=errno.EACCES))
        assert error.cause == "kvm-not-in-group"
        assert "usermod -aG 4242" not in error.fix
        assert "groupadd --gid 4242 kvm" in error.fix and "usermod -aG kvm nobody" in error.fix
        assert "group gid 4242 (no name)" in str(error)

    def test_denied_despite_group_is_a_policy(self):
        ev = evidence(groups=(1000, 4242))
        assert cause_of(facts(ev, open_errno=errno.EACCES)) == "kvm-access-policy"

    def test_an_unmapped_owner_is_nobody(self):
        # unshare -U as a user, nothing mapped: the node shows as owned by the
        # overflow id, which is also what this process shows as.
        node = {
            **KVM_NODE,
            "uid": 65534,
            "gid": 65534,
            "mode": 0o600,
            "owner": "nobody",
            "group": "nogroup",
        }
        ev = evidence(
            euid=65534,
            groups=(65534,),
            user="nobody",
            node=node,
            userns={"identity": False, "uid_map": "", "gid_map": ""},
        )
        error = b._diagnose(facts(ev, open_errno=errno.EACCES))
        assert error.cause == "kvm-userns"
        assert "mode lets this process in" not in str(error)


@pytest.mark.parametrize(
    ("number", "cause", "cls"),
    [
        (errno.EPERM, "kvm-access-policy", b.UnsupportedError),
        (errno.ENXIO, "kvm-no-driver", b.UnsupportedError),
        (errno.ENODEV, "kvm-no-driver", b.UnsupportedError),
        (errno.EMFILE, "fd-limit", b.ResourceExhaustedError),
        (errno.ENFILE, "system-file-limit", b.ResourceExhaustedError),
        (errno.ENOMEM, "out-of-memory", b.ResourceExhaustedError),
        (errno.EROFS, "kvm-open-failed", b.UnsupportedError),
    ],
)
def test_other_open_errors(number, cause, cls):
    ev = evidence(euid=0, groups=(0,), rlimit_nofile=(1024, 4096), file_max="9223372036854775807")
    error = b._diagnose(facts(ev, open_errno=number))
    assert type(error) is cls and error.cause == cause
    assert errno.errorcode[number] in str(error) and os.strerror(number) in str(error)


def test_the_gate_chains_the_os_error(mocker):
    mocker.patch.object(b, "_open_device", side_effect=OSError(errno.EROFS, "read-only"))
    with pytest.raises(b.UnsupportedError) as caught:
        b.KvmProbe("x86_64").acquire(engine=None)
    assert caught.value.__cause__.errno == errno.EROFS


def test_a_callers_exception_during_open_is_the_callers(mocker):
    """A signal handler of the caller's that raises while open() waits: its
    exception (an OSError without an errno) is not the device's answer."""
    mine = TimeoutError("the caller's deadline")
    mocker.patch.object(b, "_open_device", side_effect=mine)
    with pytest.raises(TimeoutError) as caught:
        b.SystemCheck.run(engine=None)
    assert caught.value is mine


@pytest.mark.parametrize(
    ("fields", "cause", "cls", "words"),
    [
        (
            dict(exit_reason=b.KVM_EXIT_HLT, proof=0),
            "smoke-no-proof",
            b.UnsupportedError,
            ["did not run the expected code", "0xb0c5117e", "EAX 0x0"],
        ),
        (
            dict(
                exit_reason=b.KVM_EXIT_FAIL_ENTRY,
                hardware_entry_failure_reason=0x80000021,
                fail_entry_cpu=3,
            ),
            "smoke-exit",
            b.UnsupportedError,
            ["KVM_EXIT_FAIL_ENTRY (9)", "0x80000021", "CPU 3", "KVM_EXIT_HLT (5)"],
        ),
        (
            dict(exit_reason=b.KVM_EXIT_INTERNAL_ERROR, internal_suberror=1),
            "smoke-exit",
            b.UnsupportedError,
            ["KVM_EXIT_INTERNAL_ERROR (17)", "EMULATION (1)"],
        ),
        (
            dict(exit_reason=b.KVM_EXIT_SHUTDOWN),
            "smoke-exit",
            b.UnsupportedError,
            ["KVM_EXIT_SHUTDOWN (8)", "triple-fault"],
        ),
        (dict(exit_reason=2), "smoke-exit", b.UnsupportedError, ["KVM_EXIT_IO (2)"]),
        (
            dict(step=b.STEP_RUN, timed_out=True),
            "smoke-timeout",
            b.UnsupportedError,
            ["did not halt within 2 s"],
        ),
        (
            dict(step=b.STEP_API_VERSION, api_version=11),
            "kvm-api-version",
            b.UnsupportedError,
            ["API version 11, expected 12"],
        ),
        (
            dict(step=b.STEP_API_VERSION, api_version=-1, error=errno.ENOTTY),
            "kvm-not-kvm-device",
            b.UnsupportedError,
            ["ENOTTY"],
        ),
        (
            dict(step=b.STEP_API_VERSION, api_version=-1, error=errno.EBADFD),
            "kvm-not-kvm-device",
            b.UnsupportedError,
            ["EBADFD"],
        ),
        (
            dict(step=b.STEP_CREATE_VM, error=errno.EBUSY),
            "kvm-busy",
            b.UnsupportedError,
            ["another hypervisor", "EBUSY"],
        ),
        (
            dict(step=b.STEP_CREATE_VM, error=errno.EMFILE),
            "fd-limit",
            b.ResourceExhaustedError,
            ["RLIMIT_NOFILE", "EMFILE"],
        ),
        (
            dict(step=b.STEP_GUEST_MEMORY, error=errno.ENOMEM),
            "out-of-memory",
            b.ResourceExhaustedError,
            ["ENOMEM"],
        ),
        (
            dict(step=b.STEP_CREATE_VCPU, error=errno.EPERM),
            "kvm-access-policy",
            b.UnsupportedError,
            ["EPERM", "an ioctl on /dev/kvm is refused", "no policy that answers so is visible"],
        ),
        (
            dict(step=b.STEP_SET_SREGS, error=errno.EINVAL),
            "kvm-step-failed",
            b.EngineError,
            ["KVM_SET_SREGS", "EINVAL (Invalid argument)"],
        ),
    ],
)
def test_smoke_outcomes(fields, cause, cls, words):
    ev = evidence(euid=0, groups=(0,), rlimit_nofile=(64, 4096))
    step = fields.pop("step", b.STEP_DONE)
    error = b._diagnose(facts(ev, step=step, err=fields.pop("error", 0), **fields))
    assert type(error) is cls and error.cause == cause
    for word in words:
        assert word in str(error), word
    assert error.fix


def test_any_node_that_is_not_kvm_is_not_a_kvm_device_whatever_the_errno():
    tun = {**KVM_NODE, "minor": 200}  # /dev/net/tun answers EBADFD, not ENOTTY
    for err in (errno.EBADFD, errno.ENOTTY, errno.EINVAL, errno.EIO):
        error = b._diagnose(facts(evidence(node=tun), step=b.STEP_API_VERSION, err=err))
        assert error.cause == "kvm-not-kvm-device", err
        assert "character device 10:200" in str(error) and "update the kernel" not in error.fix


def test_passing_result_has_no_diagnosis():
    f = facts(evidence(), exit_reason=b.KVM_EXIT_HLT, proof=b.PROOF_VALUE)
    assert b._diagnose(f) is None


def _smoke_result(**fields):
    r = b.SmokeResult("native", timeout=2.0)
    r.step, r.api_version = b.STEP_DONE, 12
    for key, value in fields.items():
        setattr(r, key, value)
    return r


def test_smoke_failure_closes_the_descriptor(mocker):
    device = io.FileIO("/dev/null", "r")
    fd = device.fileno()
    mocker.patch.object(b, "_open_device", return_value=device)
    mocker.patch.object(  # the gate's smoke test
        b, "_run_program", return_value=_smoke_result(exit_reason=b.KVM_EXIT_SHUTDOWN)
    )
    with pytest.raises(b.UnsupportedError):
        b.KvmProbe("x86_64").acquire(engine=None)
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF


def test_system_check_holds_and_releases_the_descriptor(mocker):
    device = io.FileIO("/dev/null", "r")
    fd = device.fileno()
    mocker.patch.object(b, "_open_device", return_value=device)
    mocker.patch.object(b, "_kvm_answers", return_value=None)  # does not speak KVM: no caps
    ok = _smoke_result(exit_reason=b.KVM_EXIT_HLT, proof=b.PROOF_VALUE)
    mocker.patch.object(b, "_run_program", return_value=ok)  # the gate's smoke test
    mocker.patch.object(b, "_PROBE", b.KvmProbe("x86_64"))
    with b.SystemCheck.run(engine=None) as host:
        assert host.fileno() == fd
        assert host.smoke_tested
    with pytest.raises(ValueError):
        host.fileno()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_architecture_without_smoke_test_passes_on_open_but_says_so(mocker):
    device = io.FileIO("/dev/null", "r")
    mocker.patch.object(b, "_open_device", return_value=device)
    mocker.patch.object(
        b, "_kvm_answers", side_effect=lambda fd, names, backend=None: dict.fromkeys(names, 1)
    )
    smoke = mocker.patch.object(b, "_run_program")  # the gate's smoke test
    mocker.patch.object(b, "_PROBE", b.KvmProbe("riscv64"))
    host = b.SystemCheck.run()
    try:
        assert smoke.call_count == 0
        assert host.smoke is None and not host.smoke_tested
        assert "not smoke-tested" in host.describe()
        assert "ran" not in host.describe().split(":")[0]
    finally:
        host.close()


# ── The gathering, through its seams ────────────────────────────────────────


def test_gathering_reads_the_cpu_and_the_modules_through_the_seams(mocker):
    texts = {"/proc/cpuinfo": "vendor_id\t: AuthenticAMD\nflags\t\t: fpu svm sse\n"}
    mocker.patch.object(b, "_read_text", side_effect=lambda path, limit=0: texts.get(path))
    mocker.patch.object(b, "_exists", side_effect=lambda path: path == "/sys/module/kvm")
    ev = b.Evidence()
    assert ev.cpu_flags == {"fpu", "svm", "sse"} and ev.vendor == "AuthenticAMD"
    assert ev.kvm_modules == ["kvm"] and ev.kvm_provider is None


@pytest.mark.parametrize(
    ("marker", "texts", "name"),
    [
        ("/run/.containerenv", {}, "podman"),
        (None, {"/proc/1/cgroup": "0::/kubepods/burstable/pod1\n"}, "kubernetes"),
        (
            "/.dockerenv",
            {"/proc/self/mountinfo": "1 0 0:1 / / rw - overlay overlay rw\n"},
            "docker",
        ),
    ],
)
def test_runtimes_are_recognised_by_their_markers(mocker, monkeypatch, marker, texts, name):
    monkeypatch.delenv("container", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    mocker.patch.object(b, "_exists", side_effect=lambda p: p == marker)
    mocker.patch.object(b, "_read_text", side_effect=lambda path, limit=0: texts.get(path))
    ev = b.Evidence()
    assert ev.runtime == name and ev.runtime_evidence


def test_dockerenv_on_a_plain_root_is_no_container(mocker, monkeypatch):
    monkeypatch.delenv("container", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    root = {"/proc/self/mountinfo": "27 1 254:0 / / rw - ext4 /dev/vda rw\n"}
    mocker.patch.object(b, "_exists", side_effect=lambda p: p == "/.dockerenv")
    mocker.patch.object(b, "_read_text", side_effect=lambda path, limit=0: root.get(path))
    assert b.Evidence().runtime is None


def test_diagnose_create_failure_returns_the_hosts_precise_error(mocker):
    mocker.patch.object(b, "_open_device", side_effect=OSError(errno.EACCES, "denied"))
    mocker.patch.object(
        b.KvmProbe, "facts", lambda self, engine, timeout: facts(evidence(), engine=engine)
    )
    engine_said = b.EngineError("Error creating the Kvm object: Error(13)")
    precise = b.KvmProbe("x86_64").diagnose_create_failure(engine_said)
    assert precise.cause == "kvm-not-in-group" and precise.__cause__ is engine_said


SEAMS = (
    "_stat",
    "_read_text",
    "_exists",
    "_getxattr",
    "_user_name",
    "_group_entry",
    "_group_named",
)


def test_a_report_asks_the_host_each_thing_once(mocker):
    """Several fields read the same file (the cgroups for the runtime, the
    device cgroup and the unit; the mounts for the node, the root and /dev;
    the status for NoNewPrivs and seccomp): one report reads each once."""
    b.check(engine=None)  # what only a first check does is not in the count
    calls = []
    for name in SEAMS:
        real = getattr(b, name)

        def seam(*args, _name=name, _real=real):
            calls.append((_name, args))
            return _real(*args)

        mocker.patch.object(b, name, side_effect=seam)
    report = b.check()
    assert len(calls) == len(set(calls)), sorted(c for c in calls if calls.count(c) > 1)
    read = {args[0] for name, args in calls if name == "_read_text"}
    assert {"/proc/self/cgroup", "/proc/self/mountinfo", "/proc/self/status"} <= read
    assert report.findings and report.host


def test_what_the_evidence_shares_is_per_evidence(mocker):
    read = mocker.patch.object(b, "_read_text", return_value="Seccomp:\t2\nNoNewPrivs:\t1\n")
    first = b.Evidence()
    assert (first.seccomp, first.no_new_privs) == ("2", True)
    assert read.call_count == 1
    read.return_value = "Seccomp:\t0\nNoNewPrivs:\t0\n"
    second = b.Evidence()  # a new check reads the host again
    assert (second.seccomp, second.no_new_privs) == ("0", False)
    assert read.call_count == 2
