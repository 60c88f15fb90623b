"""Where sandboxes really run: containers, user namespaces, clusters, Landlock,
seccomp.  Real environments built on this machine (inside `unshare -m`; the
real /dev/kvm is never touched), both backends; then the rules that need a
machine we do not have (aarch64, WSL, a device cgroup), fed evidence directly.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest
from conftest import (
    CHECK_EVERY_DOOR,
    SECCOMP_INSTALL,
    TEST_UID,
    every_door_agrees,
    evidence,
    needs_root,
)

import boxlite_syscheck as b


def both(result, key, value):
    assert result["native"][key] == value, result["native"]
    assert result["python"][key] == value, result["python"]


# ── Real environments ───────────────────────────────────────────────────────


@pytest.mark.parametrize("user", [False, True])
def test_a_node_on_a_nodev_filesystem(fault_env, user):
    fault_env.setup += [
        f"mkdir -p {fault_env.dir}/nodev",
        f"mount -t tmpfs -o nodev,mode=755 none {fault_env.dir}/nodev",
    ]
    fault_env.node_at(f"{fault_env.dir}/nodev/kvm", mode=0o666)
    fault_env.setup.append(f"mount --bind {fault_env.dir}/nodev/kvm /dev/kvm")
    result = fault_env.probe(user=user)
    both(result, "cause", "kvm-nodev")
    assert "bind-mount the host's node" in result["native"]["fix"]
    assert "usermod" not in result["python"]["fix"]


def test_an_acl_that_denies_the_user_on_an_open_node(fault_env):
    if shutil.which("setfacl") is None:
        message = "needs setfacl (Debian package acl), which .ci/run installs"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run it
        pytest.skip(message)
    fault_env.passwd_and_group()
    fault_env.kvm_node(mode=0o666)
    fault_env.setup.insert(0, f"setfacl -m u:{TEST_UID}:--- {fault_env.dir}/kvm")
    result = fault_env.probe(user=True)
    both(result, "cause", "kvm-acl-denies")
    assert f"user:{TEST_UID}" in result["native"]["message"]
    assert "not in group" not in result["native"]["message"]


def test_root_of_a_rootless_user_namespace_is_not_root(fault_env):
    fault_env.kvm_node(mode=0o600, gid=0)
    result = fault_env.probe(user=True, userns=True)
    both(result, "cause", "kvm-userns")
    assert "root here is not root on the host" in result["native"]["message"]


def test_a_rootless_container_without_the_hosts_group(fault_env):
    fault_env.passwd_and_group()
    fault_env.kvm_node(mode=0o660)
    result = fault_env.probe(user=True, userns=True)
    both(result, "cause", "kvm-userns")
    fix = result["python"]["fix"]
    assert "check in this order" in fix and "--group-add keep-groups" in fix  # two causes fit
    assert "running as root" not in result["native"]["message"]


def test_a_pod_without_the_device_is_told_to_request_it(fault_env):
    fault_env.no_kvm()
    result = fault_env.probe(env={"KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    both(result, "cause", "kvm-missing-container")
    assert "devices.kubevirt.io/kvm" in result["native"]["fix"]
    assert "mknod" not in result["native"]["fix"]


def test_a_node_with_the_wrong_numbers(fault_env):
    fault_env.node_at(f"{fault_env.dir}/kvm", minor=177, mode=0o666)
    fault_env.setup.append(f"mount --bind {fault_env.dir}/kvm /dev/kvm")
    result = fault_env.probe()
    both(result, "cause", "kvm-not-kvm-device")
    assert "character device 10:177" in result["native"]["message"]
    assert "modprobe" not in result["native"]["fix"]


def test_a_directory_where_the_device_should_be(fault_env):
    fault_env.no_kvm()
    fault_env.setup.append("mkdir /dev/kvm")
    result = fault_env.probe()
    both(result, "cause", "kvm-not-kvm-device")
    assert "it is a directory" in result["native"]["message"]
    assert "docker -v" in result["native"]["fix"]


LANDLOCK_SCRIPT = (
    r"""
import ctypes, os, struct, sys
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
ENGINE = None
for backend in ("native", "python"):  # load everything while the files can be read
    b.SystemCheck.run(backend=backend, engine=None).close()
b.check(engine=None)
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
READ_FILE, WRITE_FILE, IOCTL_DEV = 1 << 2, 1 << 1, 1 << 15
handled, allowed = ((READ_FILE | WRITE_FILE, READ_FILE) if sys.argv[2] == "open"
                    else (IOCTL_DEV, 0))
attr = struct.pack("QQQ", handled, 0, 0)
ruleset = libc.syscall(444, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
assert ruleset >= 0, ctypes.get_errno()
if allowed:  # read anything, write nothing: /dev/kvm cannot be opened read-write
    root = os.open("/", os.O_PATH | os.O_CLOEXEC)
    rule = struct.pack("=Qi", allowed, root)
    assert libc.syscall(445, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.c_char_p(rule),
                        ctypes.c_uint32(0)) == 0
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS, as Landlock wants
assert libc.syscall(446, ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0
"""
    + CHECK_EVERY_DOOR
)


@needs_root
@pytest.mark.parametrize("what", ["open", "ioctl"])
def test_a_landlock_sandbox_is_named(what, run_json):
    abi = b.Evidence().landlock_abi
    if abi is None or (what == "ioctl" and abi < 5):
        pytest.skip("this kernel's Landlock cannot restrict device ioctls (ABI < 5)")
    out = run_json(LANDLOCK_SCRIPT, what)
    every_door_agrees(out)
    both(out, "cause", "kvm-landlock-denied")
    assert ("opening /dev/kvm" if what == "open" else "an ioctl on /dev/kvm") in out["native"][
        "message"
    ]
    assert "LANDLOCK_ACCESS_FS_IOCTL_DEV" in out["python"]["fix"]
    assert "update the kernel" not in out["python"]["fix"]
    assert "lets no group in" not in out["native"]["message"]  # not blamed on the mode


SECCOMP_SCRIPT = (
    SECCOMP_INSTALL
    + r"""
import sys
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
ENGINE = None
for backend in ("native", "python"):
    b.SystemCheck.run(backend=backend, engine=None).close()
b.check(engine=None)
_install_seccomp(int(sys.argv[2]), int(sys.argv[3]))
"""
    + CHECK_EVERY_DOOR
)


@needs_root
def test_eacces_on_an_ioctl_is_a_policy_never_update_the_kernel(run_json):
    # EACCES, as an SELinux ioctl denial answers.
    out = run_json(SECCOMP_SCRIPT, str(b.KVM_CREATE_VM), str(errno.EACCES))
    every_door_agrees(out)
    # The filter is shown; Landlock (invisible) could answer EACCES too:
    # both are named, the one the evidence shows first.
    both(out, "cause", "kvm-access-policy")
    both(out, "type", "UnsupportedError")
    assert "check in this order: (1) seccomp" in out["native"]["fix"]
    assert "(2) Landlock" in out["native"]["fix"]
    assert "update the kernel" not in out["native"]["fix"]


@needs_root
def test_eperm_from_seccomp_is_seccomp_alone(run_json):
    # EPERM, as Docker's default profile answers: never Landlock or an LSM.
    out = run_json(SECCOMP_SCRIPT, str(b.KVM_CREATE_VM), str(errno.EPERM))
    every_door_agrees(out)
    both(out, "cause", "kvm-seccomp-denied")
    assert "Landlock" not in out["native"]["message"] + out["native"]["fix"]
    assert "an ioctl on /dev/kvm" in out["python"]["message"]


# ── Rules fed evidence directly ─────────────────────────────────────────────


def cause(step, err, ev, machine="x86_64"):
    facts = b.Facts("linux", machine, engine=None, evidence=ev)
    if step == b.STEP_OPEN:
        facts.open_errno = err
    else:
        facts.smoke = b.SmokeResult("python")
        facts.smoke.step, facts.smoke.error = step, err
    return b._diagnose(facts)


def test_aarch64_without_a_node_means_no_el2_and_says_nothing_of_vt_x():
    error = cause(b.STEP_OPEN, errno.ENOENT, evidence(node=None, cpu_flags=None), "aarch64")
    assert error.cause == "kvm-no-el2"
    assert "EL2" in error.fix and "VT-x" not in str(error) and "kvm_intel" not in error.fix


def test_aarch64_with_kvm_registered_but_no_node():
    ev = evidence(node=None, kvm_registered=True)
    assert cause(b.STEP_OPEN, errno.ENOENT, ev, "aarch64").cause == "kvm-node-missing"


def test_wsl1_is_told_to_convert():
    error = cause(b.STEP_OPEN, errno.ENOENT, evidence(node=None, wsl="1"))
    assert error.cause == "kvm-wsl1" and "wsl --set-version DISTRO 2" in error.fix


def test_a_pvm_host_is_told_to_load_kvm_pvm():
    ev = evidence(node=None, cpu_flags={"hypervisor"}, module_available={"kvm_pvm": True})
    error = cause(b.STEP_OPEN, errno.ENOENT, ev)
    assert error.cause == "kvm-pvm-not-loaded" and "modprobe kvm_pvm" in error.fix
    assert "nested" not in error.fix


def test_eperm_in_a_container_is_the_device_cgroup():
    ev = evidence(euid=0, groups=(0,), runtime="docker", cgroup={"devices": "/docker/1"})
    error = cause(b.STEP_OPEN, errno.EPERM, ev)
    assert error.cause == "kvm-device-cgroup"
    assert "--device /dev/kvm" in error.fix and "c 10:232 rwm" in error.fix


def test_two_sandboxes_that_could_refuse_are_both_named_in_order():
    ev = evidence(euid=0, groups=(0,), seccomp="2", landlock_abi=7, no_new_privs=True)
    error = cause(b.STEP_OPEN, errno.EACCES, ev)
    assert error.cause == "kvm-access-policy"
    assert "check in this order: (1) seccomp" in error.fix and "(2) Landlock" in error.fix


def test_flatpak_and_snap_get_their_own_fixes():
    flatpak = cause(b.STEP_OPEN, errno.ENOENT, evidence(node=None, runtime="flatpak"))
    assert "flatpak override --device=kvm" in flatpak.fix
    snap = cause(b.STEP_OPEN, errno.ENOENT, evidence(node=None, runtime="snap", snap="firefox"))
    assert "snap connect firefox:kvm" in snap.fix


def test_a_root_private_dev_without_context_gets_the_service_fix():
    error = cause(b.STEP_OPEN, errno.ENOENT, evidence(node=None, private_dev=True))
    assert error.cause == "kvm-missing-container" and "PrivateDevices" in error.fix


def test_evidence_of_this_process(kvm_fd):
    ev = b.Evidence()
    assert ev.is_kvm_node() and ev.euid == os.geteuid()
    assert ev.mount["point"] in ("/dev", "/dev/kvm")
    assert isinstance(ev.as_dict()["groups"], list)
