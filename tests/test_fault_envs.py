"""Real fault environments: mount namespaces, device nodes, users and limits.

Each test builds its fault inside ``unshare -m`` (see FaultEnv in conftest.py)
and runs SystemCheck.run() there with both backends.
"""

from __future__ import annotations

import json

import pytest
from conftest import KVM_GID, PVM_HOST

EMFILE_SCRIPT = r"""
import json, os, resource, sys
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
out = {}
for backend in ("native", "python"):
    b.SystemCheck.run(backend=backend, engine=None).close()  # load everything first
    probe = os.open("/dev/null", os.O_RDONLY)
    os.close(probe)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe + 1, hard))  # /dev/kvm fits, a VM not
    try:
        b.SystemCheck.run(backend=backend, engine=None).close()
        out[backend] = {"ok": True}
    except b.BoxliteError as err:
        out[backend] = {"ok": False, "type": type(err).__name__, "cause": err.cause,
                        "message": str(err)}
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print(json.dumps(out))
"""


def both(result, key, value):
    assert result["native"][key] == value, result["native"]
    assert result["python"][key] == value, result["python"]


def test_root_passes_with_both_backends_alike(fault_env):
    result = fault_env.probe()
    both(result, "ok", True)
    assert result["native"]["outcome"] == result["python"]["outcome"]
    assert result["python"]["backend"] == "python"


def test_user_without_the_group_gets_the_group_fix(fault_env):
    fault_env.passwd_and_group(members="")
    fault_env.kvm_node(mode=0o660)
    result = fault_env.probe(user=True)
    both(result, "cause", "kvm-not-in-group")
    both(result, "type", "UnsupportedError")
    assert "usermod -aG kvmtest boxtest" in result["native"]["fix"]
    assert "EACCES (Permission denied)" in result["native"]["message"]


def test_user_with_the_group_passes(fault_env):
    fault_env.passwd_and_group(members="boxtest")
    fault_env.kvm_node(mode=0o660)
    result = fault_env.probe(user=True, groups=str(KVM_GID))
    both(result, "ok", True)
    assert result["native"]["outcome"] == result["python"]["outcome"]


def test_default_gate_for_a_user_with_the_group_names_the_emulation(fault_env):
    if not PVM_HOST:
        import pytest

        pytest.skip("needs a kvm_pvm host, where stock guest code is emulated")
    fault_env.passwd_and_group(members="boxtest")
    fault_env.kvm_node(mode=0o660)
    result = fault_env.probe(engine="libkrun", user=True, groups=str(KVM_GID))
    both(result, "ok", False)
    both(result, "cause", "guest-emulated-pvm")
    assert "lock cmpxchg16b" in result["native"]["message"]
    assert "PVM-enabled guest kernel" in result["python"]["fix"]


def test_listed_in_group_but_session_lacks_it(fault_env):
    fault_env.passwd_and_group(members="boxtest")
    fault_env.kvm_node(mode=0o660)
    result = fault_env.probe(user=True)
    both(result, "cause", "kvm-stale-session")
    assert "log out and back in" in result["python"]["fix"]
    assert "usermod" not in result["python"]["fix"]


def test_owner_only_mode_says_no_group_can_help(fault_env):
    fault_env.passwd_and_group(members="boxtest")
    fault_env.kvm_node(mode=0o600)
    result = fault_env.probe(user=True, groups=str(KVM_GID))
    both(result, "cause", "kvm-mode-no-group")
    assert "0600" in result["native"]["message"]


def test_no_dev_kvm(fault_env):
    fault_env.no_kvm()
    result = fault_env.probe()
    # A tmpfs over /dev: a private /dev, as a sandbox or PrivateDevices= gives.
    # The device must be passed in; mknod would be the wrong fix.
    both(result, "cause", "kvm-missing-container")
    assert "ENOENT (No such file or directory)" in result["native"]["message"]
    assert "mknod" not in result["native"]["fix"]
    assert "private /dev" in result["native"]["message"]
    assert "PrivateDevices=no" in result["python"]["fix"]


@pytest.mark.parametrize("engine", ["none", "libkrun"])
def test_dev_null_over_dev_kvm_is_not_a_kvm_device(fault_env, engine):
    fault_env.setup.append("mount --bind /dev/null /dev/kvm")
    result = fault_env.probe(engine)  # every door: the gate, check() and the CLI agree
    both(result, "cause", "kvm-not-kvm-device")
    assert "ENOTTY" in result["native"]["message"]
    assert "character device 1:3" in result["python"]["message"]
    # A bind mount is undone with umount, not by removing the node under it.
    assert "sudo umount /dev/kvm" in result["native"]["fix"]
    assert "mknod" not in result["native"]["fix"]


def test_dev_net_tun_over_dev_kvm_is_not_a_kvm_device(fault_env):
    # The tun device answers KVM_GET_API_VERSION with EBADFD, not ENOTTY: still
    # no KVM device, never "update the kernel".
    fault_env.setup.append("mount --bind /dev/net/tun /dev/kvm")
    result = fault_env.probe("libkrun")  # every door agrees
    both(result, "cause", "kvm-not-kvm-device")
    assert "EBADFD" in result["native"]["message"]
    assert "character device 10:200" in result["python"]["message"]
    assert "sudo umount /dev/kvm" in result["native"]["fix"]
    assert "kernel" not in result["native"]["fix"]


def test_descriptor_limit_is_resource_exhaustion(fault_env):
    done = fault_env.run(EMFILE_SCRIPT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    both(result, "type", "ResourceExhaustedError")
    both(result, "cause", "fd-limit")
    assert "EMFILE" in result["native"]["message"]
    assert "create a VM" in result["python"]["message"]


def test_cli_in_a_fault_environment_exits_1_with_the_fix(fault_env):
    fault_env.passwd_and_group(members="")
    fault_env.kvm_node(mode=0o660)
    done = fault_env.run(
        "import sys; sys.path.insert(0, sys.argv[1]); import boxlite_syscheck as b;"
        " sys.exit(b.main(['--json', '--engine', 'none']))",
        user=True,
    )
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "not-usable"
    failing = [f for f in report["findings"] if f["status"] == "fail"]
    assert [f["id"] for f in failing] == ["kvm.smoke"]
    assert "usermod -aG kvmtest boxtest" in failing[0]["fix"]
    assert report["error"]["cause"] == "kvm-not-in-group"
