"""Where sandboxes really run: containers, user namespaces, clusters, Landlock,
seccomp.  Real environments built on this machine (inside `unshare -m`; the
real /dev/kvm is never touched), both backends; then the rules that need a
machine we do not have (aarch64, WSL, a device cgroup), fed evidence directly.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import KVM_GID, SECCOMP_INSTALL, TEST_UID, needs_root, run_script

import boxlite_syscheck as b


def both(result, key, value):
    assert result["native"][key] == value, result["native"]
    assert result["python"][key] == value, result["python"]


# ── Real environments ───────────────────────────────────────────────────────


@pytest.mark.parametrize("user", [False, True])
def test_a_node_on_a_nodev_filesystem(fault_env, user):
    fault_env.setup += [f"mkdir -p {fault_env.dir}/nodev",
                        f"mount -t tmpfs -o nodev,mode=755 none {fault_env.dir}/nodev"]
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


# The end of each sandbox script: the bare check with both backends, as JSON.
CHECK_BOTH = r"""
out = {}
for backend in ("native", "python"):
    try:
        b.SystemCheck.run(backend=backend, engine=None).close()
        out[backend] = {"cause": None}
    except b.BoxliteError as err:
        out[backend] = {"cause": err.cause, "type": type(err).__name__,
                        "message": str(err), "fix": err.fix}
print(json.dumps(out))
"""


LANDLOCK_SCRIPT = r"""
import ctypes, json, os, struct, sys
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
for backend in ("native", "python"):  # load everything while the files can be read
    b.SystemCheck.run(backend=backend, engine=None).close()
    b._gather_evidence()
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
""" + CHECK_BOTH


@needs_root
@pytest.mark.parametrize("what", ["open", "ioctl"])
def test_a_landlock_sandbox_is_named(what):
    if b._landlock_abi() is None or (what == "ioctl" and b._landlock_abi() < 5):
        pytest.skip("this kernel's Landlock cannot restrict device ioctls (ABI < 5)")
    done = run_script(LANDLOCK_SCRIPT, what)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    both(out, "cause", "kvm-landlock-denied")
    assert ("opening /dev/kvm" if what == "open" else "an ioctl on /dev/kvm") in out["native"]["message"]
    assert "LANDLOCK_ACCESS_FS_IOCTL_DEV" in out["python"]["fix"]
    assert "update the kernel" not in out["python"]["fix"]
    assert "lets no group in" not in out["native"]["message"]  # not blamed on the mode


SECCOMP_EACCES_SCRIPT = SECCOMP_INSTALL + r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
for backend in ("native", "python"):
    b.SystemCheck.run(backend=backend, engine=None).close()
_install_seccomp(b.KVM_CREATE_VM, 13)  # EACCES, as an SELinux ioctl denial answers
""" + CHECK_BOTH


@needs_root
def test_eacces_on_an_ioctl_is_a_policy_never_update_the_kernel():
    done = run_script(SECCOMP_EACCES_SCRIPT)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    # The filter needs NoNewPrivs, so Landlock is possible too (its domains are
    # invisible): both are named, the one the evidence shows first.
    both(out, "cause", "kvm-access-policy")
    both(out, "type", "UnsupportedError")
    assert "check in this order: (1) seccomp" in out["native"]["fix"]
    assert "(2) Landlock" in out["native"]["fix"]
    assert "update the kernel" not in out["native"]["fix"]


# ── Rules fed evidence directly ─────────────────────────────────────────────

KVM_NODE = {"kind": "character device", "major": 10, "minor": 232, "uid": 0, "gid": 992,
            "mode": 0o660, "owner": "root", "group": "kvm"}


def evidence(**fields):
    base = dict(path="/dev/kvm", euid=1000, egid=1000, groups=(1000,), user="alice",
                node=dict(KVM_NODE), arch="x86_64", cpu_flags={"vmx"}, kvm_modules=["kvm"],
                userns={"identity": True}, mount={"point": "/dev", "fstype": "devtmpfs",
                                                  "options": ["rw"]})
    base.update(fields)
    return b.Evidence(**base)


def cause(step, err, ev):
    return b.diagnose_access(step, err, ev)


def test_aarch64_without_a_node_means_no_el2_and_says_nothing_of_vt_x():
    error = cause(b.STEP_OPEN, 2, evidence(node=None, arch="aarch64", cpu_flags=None))
    assert error.cause == "kvm-no-el2"
    assert "EL2" in error.fix and "VT-x" not in str(error) and "kvm_intel" not in error.fix


def test_aarch64_with_kvm_registered_but_no_node():
    error = cause(b.STEP_OPEN, 2, evidence(node=None, arch="aarch64", kvm_registered=True))
    assert error.cause == "kvm-node-missing"


def test_wsl1_is_told_to_convert():
    error = cause(b.STEP_OPEN, 2, evidence(node=None, wsl="1"))
    assert error.cause == "kvm-wsl1" and "wsl --set-version DISTRO 2" in error.fix


def test_a_pvm_host_is_told_to_load_kvm_pvm():
    error = cause(b.STEP_OPEN, 2, evidence(node=None, cpu_flags={"hypervisor"},
                                           module_available={"kvm_pvm": True}))
    assert error.cause == "kvm-pvm-not-loaded" and "modprobe kvm_pvm" in error.fix
    assert "nested" not in error.fix


def test_eperm_in_a_container_is_the_device_cgroup():
    error = cause(b.STEP_OPEN, 1, evidence(euid=0, groups=(0,), runtime="docker"))
    assert error.cause == "kvm-device-cgroup"
    assert "--device /dev/kvm" in error.fix and "c 10:232 rwm" in error.fix


def test_two_sandboxes_that_could_refuse_are_both_named_in_order():
    ev = evidence(euid=0, groups=(0,), seccomp="2", landlock_abi=7, no_new_privs=True)
    error = cause(b.STEP_OPEN, 13, ev)
    assert error.cause == "kvm-access-policy"
    assert "check in this order: (1) seccomp" in error.fix and "(2) Landlock" in error.fix


def test_flatpak_and_snap_get_their_own_fixes():
    assert "flatpak override --device=kvm" in cause(b.STEP_OPEN, 2, evidence(node=None, flatpak=True)).fix
    assert "snap connect firefox:kvm" in cause(b.STEP_OPEN, 2, evidence(node=None, snap="firefox")).fix


def test_a_root_private_dev_without_context_gets_the_service_fix():
    error = cause(b.STEP_OPEN, 2, evidence(node=None, private_dev=True))
    assert error.cause == "kvm-missing-container" and "PrivateDevices" in error.fix


def test_the_rules_fit_on_one_screen():
    assert len(b.ACCESS_RULES) <= 20
    assert len({name for name, _ in b.ACCESS_RULES}) == len(b.ACCESS_RULES)


def test_evidence_of_this_process(kvm_fd):
    ev = b._gather_evidence()
    assert ev.is_kvm_node() and ev.euid is not None
    assert ev.mount["point"] in ("/dev", "/dev/kvm")
    assert isinstance(ev.as_dict()["groups"], list)


def test_kvm_gid_is_the_fault_envs_group():
    assert KVM_GID == 4242  # the group the fault environments give their node
