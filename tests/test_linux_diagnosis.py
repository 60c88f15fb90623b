"""Linux: every cause through the module's seams (no real fault needed)."""

from __future__ import annotations

import errno
import os

import pytest

import boxlite_syscheck as b


def open_fails(mocker, number):
    return mocker.patch.object(b, "_open_device", side_effect=OSError(number, os.strerror(number)))


def facts(mocker, *, exists=(), texts=None, release="6.1.0-amd64"):
    """Patch the host-fact seams: which marker paths exist, file contents."""
    texts = texts or {}
    mocker.patch.object(b, "_exists", side_effect=lambda p: p in exists)
    mocker.patch.object(b, "_read_text", side_effect=lambda p: texts.get(p))
    mocker.patch.object(b, "_kernel_release", return_value=release)


def acquire_error(probe=None):
    probe = probe or b.KvmProbe("x86_64")
    with pytest.raises(b.BoxliteError) as caught:
        probe.acquire()
    return caught.value


INTEL = {"/proc/cpuinfo": "vendor_id\t: GenuineIntel\nflags\t\t: fpu vmx sse\n"}
AMD = {"/proc/cpuinfo": "vendor_id\t: AuthenticAMD\nflags\t\t: fpu svm sse\n"}
GUEST = {"/proc/cpuinfo": "vendor_id\t: AuthenticAMD\nflags\t\t: fpu hypervisor sse\n"}
BARE = {"/proc/cpuinfo": "vendor_id\t: GenuineIntel\nflags\t\t: fpu sse\n"}


class TestMissingDevice:
    def test_module_not_loaded_on_intel(self, mocker):
        open_fails(mocker, errno.ENOENT)
        facts(mocker, texts=INTEL)
        err = acquire_error()
        assert isinstance(err, b.UnsupportedError)
        assert err.cause == "kvm-module-not-loaded"
        assert "modprobe kvm_intel" in err.fix
        assert "ENOENT (No such file or directory)" in str(err)

    def test_module_not_loaded_on_amd(self, mocker):
        open_fails(mocker, errno.ENOENT)
        facts(mocker, texts=AMD)
        assert "modprobe kvm_amd" in acquire_error().fix

    def test_vm_without_nested_virtualization(self, mocker):
        open_fails(mocker, errno.ENOENT)
        facts(mocker, texts=GUEST)
        err = acquire_error()
        assert err.cause == "kvm-no-nested"
        assert "nested virtualization" in err.fix

    def test_no_virtualization_in_cpu(self, mocker):
        open_fails(mocker, errno.ENOENT)
        facts(mocker, texts=BARE)
        err = acquire_error()
        assert err.cause == "kvm-no-virtualization"
        assert "BIOS/UEFI" in err.fix

    def test_module_loaded_but_no_node(self, mocker):
        open_fails(mocker, errno.ENOENT)
        facts(mocker, exists={"/sys/module/kvm", "/sys/module/kvm_intel"}, texts=INTEL)
        err = acquire_error()
        assert err.cause == "kvm-node-missing"
        assert "mknod /dev/kvm c 10 232" in err.fix

    @pytest.mark.parametrize("how", ["interop", "release"])
    def test_wsl2(self, mocker, how):
        open_fails(mocker, errno.ENOENT)
        if how == "interop":
            facts(mocker, exists={b._WSL_INTEROP}, texts=INTEL)
        else:
            facts(mocker, texts=INTEL, release="5.15.153.1-microsoft-standard-WSL2")
        err = acquire_error()
        assert err.cause == "kvm-missing-wsl"
        assert "Windows 11" in err.fix
        assert "nestedVirtualization=true" in err.fix
        assert "wsl --shutdown" in err.fix

    @pytest.mark.parametrize(("marker", "texts", "name"), [
        ("/run/.containerenv", {}, "podman"),
        (None, {"/proc/1/cgroup": "0::/kubepods/burstable/pod1\n"}, "kubernetes"),
        ("/.dockerenv", {"/proc/self/mountinfo": "1 0 0:1 / / rw - overlay overlay rw\n"}, "docker"),
    ])
    def test_container(self, mocker, marker, texts, name):
        open_fails(mocker, errno.ENOENT)
        facts(mocker, exists={marker} if marker else set(), texts={**INTEL, **texts})
        err = acquire_error()
        assert err.cause == "kvm-missing-container"
        assert err.evidence["context"] == name
        assert "mknod" not in err.fix  # pass the device in, never create one inside
        assert ("devices.kubevirt.io/kvm" if name == "kubernetes" else "--device /dev/kvm") in err.fix

    def test_dockerenv_on_a_plain_root_is_no_container(self, mocker):
        open_fails(mocker, errno.ENOENT)
        facts(mocker, exists={"/.dockerenv"},
              texts={**INTEL, "/proc/self/mountinfo": "27 1 254:0 / / rw - ext4 /dev/vda rw\n"})
        assert acquire_error().cause == "kvm-module-not-loaded"


class TestAccessDenied:
    @pytest.fixture
    def device(self, mocker):
        def make(mode, gid=4242, members=(), held=False, user_gid=1000):
            st = os.stat_result((0o020000 | mode, 0, 0, 1, 0, gid, 0, 0, 0, 0),
                                {"st_rdev": os.makedev(10, 232)})
            mocker.patch.object(b, "_stat", return_value=st)
            mocker.patch.object(b, "_group_name", return_value="kvm")
            mocker.patch.object(b, "_user_name", return_value="alice")
            listed = "alice" in members or user_gid == gid
            mocker.patch.object(b, "_group_membership", return_value=("alice", listed, held))
            # The process is alice (uid 1000), holding the device's group only when `held`.
            mocker.patch.object(b.os, "geteuid", return_value=1000)
            mocker.patch.object(b.os, "getegid", return_value=user_gid)
            mocker.patch.object(b.os, "getgroups", return_value=[gid] if held else [user_gid])
            open_fails(mocker, errno.EACCES)
        return make

    def test_not_in_group(self, device):
        device(0o660)
        err = acquire_error()
        assert err.cause == "kvm-not-in-group"
        assert "usermod -aG kvm alice" in err.fix
        assert "does not pick up new groups" in err.fix

    def test_stale_session(self, device):
        device(0o660, members=("alice",))
        err = acquire_error()
        assert err.cause == "kvm-stale-session"
        assert "log out and back in" in err.fix
        assert "usermod" not in err.fix

    def test_mode_without_group_access(self, device, mocker):
        device(0o600)
        mocker.patch("grp.getgrnam", return_value=object())  # a kvm group exists
        err = acquire_error()
        assert err.cause == "kvm-mode-no-group"
        assert "0600" in str(err)
        assert "/etc/udev/rules.d/65-kvm.rules" in err.fix
        assert "udevadm control --reload" in err.fix and "udevadm trigger --name-match=kvm" in err.fix
        assert "usermod -aG kvm" in err.fix and "groupadd" not in err.fix

    def test_mode_without_group_access_on_a_host_without_a_kvm_group(self, device, mocker):
        device(0o600)
        mocker.patch("grp.getgrnam", side_effect=KeyError("kvm"))
        fix = acquire_error().fix
        assert fix.startswith("`sudo groupadd --system kvm`")

    def test_denied_despite_group(self, device):
        device(0o660, held=True)
        assert acquire_error().cause == "kvm-access-policy"


@pytest.mark.parametrize(("number", "cause", "cls"), [
    (errno.EPERM, "kvm-access-policy", b.UnsupportedError),
    (errno.ENXIO, "kvm-no-driver", b.UnsupportedError),
    (errno.ENODEV, "kvm-no-driver", b.UnsupportedError),
    (errno.EMFILE, "fd-limit", b.ResourceExhaustedError),
    (errno.ENFILE, "system-file-limit", b.ResourceExhaustedError),
    (errno.ENOMEM, "out-of-memory", b.ResourceExhaustedError),
    (errno.EROFS, "kvm-open-failed", b.UnsupportedError),
])
def test_other_open_errors(mocker, number, cause, cls):
    open_fails(mocker, number)
    facts(mocker, texts=INTEL)
    err = acquire_error()
    assert type(err) is cls
    assert err.cause == cause
    assert errno.errorcode[number] in str(err)
    assert os.strerror(number) in str(err)
    assert err.__cause__ is not None and err.__cause__.errno == number


def result(**fields):
    r = b.SmokeResult("native", timeout=2.0)
    r.step, r.api_version = b.STEP_DONE, 12
    for key, value in fields.items():
        setattr(r, key, value)
    return r


OK = dict(exit_reason=b.KVM_EXIT_HLT, proof=b.PROOF_VALUE)


@pytest.mark.parametrize(("fields", "cause", "cls", "words"), [
    (dict(exit_reason=b.KVM_EXIT_HLT, proof=0), "smoke-no-proof", b.UnsupportedError,
     ["did not run the expected code", "0xb0c5117e"]),
    (dict(exit_reason=b.KVM_EXIT_FAIL_ENTRY, hardware_entry_failure_reason=0x80000021,
          fail_entry_cpu=3), "smoke-exit", b.UnsupportedError,
     ["KVM_EXIT_FAIL_ENTRY (9)", "0x80000021", "CPU 3", "KVM_EXIT_HLT (5)"]),
    (dict(exit_reason=b.KVM_EXIT_INTERNAL_ERROR, internal_suberror=1), "smoke-exit",
     b.UnsupportedError, ["KVM_EXIT_INTERNAL_ERROR (17)", "EMULATION (1)"]),
    (dict(exit_reason=b.KVM_EXIT_SHUTDOWN), "smoke-exit", b.UnsupportedError,
     ["KVM_EXIT_SHUTDOWN (8)", "triple-fault"]),
    (dict(exit_reason=2), "smoke-exit", b.UnsupportedError, ["KVM_EXIT_IO (2)"]),
    (dict(step=b.STEP_RUN, timed_out=True), "smoke-timeout", b.UnsupportedError,
     ["did not halt within 2 s"]),
    (dict(step=b.STEP_API_VERSION, api_version=11), "kvm-api-version", b.UnsupportedError,
     ["API version 11, expected 12"]),
    (dict(step=b.STEP_API_VERSION, api_version=-1, error=errno.ENOTTY), "kvm-not-kvm-device",
     b.UnsupportedError, ["ENOTTY"]),
    (dict(step=b.STEP_API_VERSION, api_version=-1, error=errno.EINVAL), "kvm-not-kvm-device",
     b.UnsupportedError, ["EINVAL"]),
    (dict(step=b.STEP_CREATE_VM, error=errno.ENOTTY), "kvm-not-kvm-device",
     b.UnsupportedError, ["ENOTTY"]),
    (dict(step=b.STEP_CREATE_VM, error=errno.EBUSY), "kvm-busy", b.UnsupportedError,
     ["another hypervisor", "EBUSY"]),
    (dict(step=b.STEP_CREATE_VM, error=errno.EMFILE), "fd-limit", b.ResourceExhaustedError,
     ["RLIMIT_NOFILE", "EMFILE"]),
    (dict(step=b.STEP_GUEST_MEMORY, error=errno.ENOMEM), "out-of-memory",
     b.ResourceExhaustedError, ["ENOMEM"]),
    (dict(step=b.STEP_CREATE_VCPU, error=errno.EPERM), "kvm-access-policy", b.UnsupportedError,
     ["EPERM", "refused by a policy, although the device's mode lets this process in"]),
    (dict(step=b.STEP_SET_SREGS, error=errno.EINVAL), "kvm-step-failed", b.EngineError,
     ["KVM_SET_SREGS", "EINVAL (Invalid argument)"]),
])
def test_smoke_outcomes(mocker, fields, cause, cls, words):
    mocker.patch.object(b, "_stat", side_effect=OSError(errno.ENOENT, "gone"))
    err = b.diagnose(result(**fields))
    assert type(err) is cls
    assert err.cause == cause
    for word in words:
        assert word in str(err)
    assert err.fix


def test_passing_result_has_no_diagnosis():
    assert b.diagnose(result(**OK)) is None


def test_smoke_failure_closes_the_descriptor(mocker):
    fd = os.open("/dev/null", os.O_RDONLY)
    mocker.patch.object(b, "_open_device", return_value=fd)
    mocker.patch.object(b, "smoke_test", return_value=result(exit_reason=b.KVM_EXIT_SHUTDOWN))
    with pytest.raises(b.UnsupportedError):
        b.KvmProbe("x86_64").acquire()
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF


def test_system_check_holds_and_releases_the_descriptor(mocker):
    fd = os.open("/dev/null", os.O_RDONLY)
    mocker.patch.object(b, "_open_device", return_value=fd)
    mocker.patch.object(b, "_speaks_kvm", return_value=False)  # no capability check
    mocker.patch.object(b, "smoke_test", return_value=result(**OK))
    mocker.patch.object(b, "_PROBE", b.KvmProbe("x86_64"))
    with b.SystemCheck.run() as host:
        assert host.fileno() == fd
        assert host.smoke_tested
    with pytest.raises(ValueError):
        host.fileno()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_architecture_without_smoke_test_passes_on_open_but_says_so(mocker):
    fd = os.open("/dev/null", os.O_RDONLY)
    mocker.patch.object(b, "_open_device", return_value=fd)
    mocker.patch.object(b, "_speaks_kvm", return_value=True)
    mocker.patch.object(b, "_capability_values", side_effect=lambda fd, names: dict.fromkeys(names, 1))
    smoke = mocker.patch.object(b, "smoke_test")
    mocker.patch.object(b, "_PROBE", b.KvmProbe("riscv64"))
    host = b.SystemCheck.run()
    try:
        assert smoke.call_count == 0
        assert host.smoke is None and not host.smoke_tested
        assert "not smoke-tested" in host.describe()
        assert "ran" not in host.describe().split(":")[0]
    finally:
        host.close()


def test_diagnose_create_failure_returns_the_hosts_precise_error(mocker):
    precise = b.UnsupportedError("not in group kvm", cause="kvm-not-in-group")
    mocker.patch.object(b.KvmProbe, "acquire", side_effect=precise)
    engine_said = b.EngineError("Error creating the Kvm object: Error(13)")
    assert b.KvmProbe("x86_64").diagnose_create_failure(engine_said) is precise


def test_diagnose_create_failure_decodes_when_the_host_passes(mocker):
    mocker.patch.object(b.KvmProbe, "acquire", return_value=(os.open("/dev/null", os.O_RDONLY), None))
    said = b.EngineError("Missing KVM capabilities: [0x24]")
    refined = b.KvmProbe("x86_64").diagnose_create_failure(said, engine="firecracker")
    assert isinstance(refined, b.EngineError) and refined.cause == "engine-error-decoded"
    assert "KVM_CAP_IOEVENTFD (36) is missing" in str(refined)
    plain = b.EngineError("krun_start_enter failed")
    mocker.patch.object(b.KvmProbe, "acquire", return_value=(None, None))
    assert b.KvmProbe("x86_64").diagnose_create_failure(plain) is plain
