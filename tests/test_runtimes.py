"""Where sandboxes run, for real: device cgroups, container runtimes and sandboxes.

Each test builds the environment with the real tool on this machine (the
Debian packages .ci/run installs), runs one script inside it, and compares
the ground truth -- what a VMM's own open and first ioctls get there -- with
the gate (both backends), check() and the CLI.  Devices and mounts change
only inside the tools' own namespaces; cgroups are children this file makes
and removes.  Recipes: ../shared/research/real-runtimes.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    CHECK_EVERY_DOOR,
    KVM_GID,
    ROOT,
    SECCOMP_INSTALL,
    SYSTEM_PYTHON,
    TEST_GID,
    TEST_UID,
    every_door_agrees,
    needs,
)

# What a VMM's own open and first ioctls get here, then every door.
SCRIPT = (
    r"""
import errno, fcntl, os, sys
sys.path.insert(0, sys.argv[1])


def vmm():
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return ["open", errno.errorcode.get(err.errno, str(err.errno))]
    try:
        if fcntl.ioctl(fd, 0xAE00) != 12:  # KVM_GET_API_VERSION
            return ["api-version", None]
        os.close(fcntl.ioctl(fd, 0xAE01, 0))  # KVM_CREATE_VM
        return ["ok", None]
    except OSError as err:
        return ["ioctl", errno.errorcode.get(err.errno, str(err.errno))]
    finally:
        os.close(fd)


VMM = vmm()
"""
    + "import boxlite_syscheck as b\nENGINE = None\n"
    + CHECK_EVERY_DOOR.replace("print(json.dumps(out))", "out['vmm'] = VMM\nprint(json.dumps(out))")
)

CGROUP_V1 = Path("/sys/fs/cgroup/devices")
UNIFIED = Path("/sys/fs/cgroup/unified")


def agrees_with_the_vmm(out: dict[str, Any], cause: str | None) -> None:
    """Every door names ``cause``, and the ground truth agrees with it: the
    device works for a VMM exactly when the gate passes, and the errno the
    VMM got is the one the error names."""
    every_door_agrees(out)
    assert out["native"]["cause"] == cause, out["native"]
    where, err = out["vmm"]
    if cause is None:
        assert where == "ok", out["vmm"]
    else:
        assert where != "ok", out["vmm"]
        assert err is None or err in out["native"]["message"], (out["vmm"], out["native"])


class Env:
    """The module in a world-readable directory, a root filesystem made of
    the host's /usr and /etc, and a way to run the script in a runtime."""

    def __init__(self, tmp: Path) -> None:
        os.chmod(tmp, 0o755)
        self.tmp = tmp
        self.app = tmp / "app"
        self.app.mkdir()
        shutil.copy(ROOT / "boxlite_syscheck.py", self.app)
        shutil.copy(ROOT / "libkvmsmoke.so", self.app)
        self.rootfs = tmp / "rootfs"
        for name in ("usr", "etc", "proc", "sys", "dev", "tmp", "run", "var", "root"):
            (self.rootfs / name).mkdir(parents=True)
        (self.rootfs / self.app.relative_to("/")).mkdir(parents=True)
        for name in ("lib", "lib64", "bin", "sbin"):
            os.symlink(f"usr/{name}", self.rootfs / name)
        for path in (self.app, *self.app.iterdir(), *self.app.parents):
            if str(path).startswith(str(tmp)):
                os.chmod(path, 0o755 if path.is_dir() else 0o644)

    def argv(self) -> list[str]:
        return [SYSTEM_PYTHON, "-c", SCRIPT, str(self.app)]

    def run(self, prefix: list[str], *, timeout: float = 120, **kwargs: Any) -> dict[str, Any]:
        done = subprocess.run(
            [*prefix, *self.argv()], capture_output=True, text=True, timeout=timeout, **kwargs
        )
        lines = done.stdout.strip().splitlines()
        assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
        out: dict[str, Any] = json.loads(lines[-1])
        return out


@pytest.fixture
def env():
    # Not under pytest's tmp_path: every user must reach it (its parents are 0700).
    workdir = Path(tempfile.mkdtemp(prefix="bsc-runtime-"))
    try:
        yield Env(workdir)
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(workdir)], check=False)


# ── The cgroup v1 devices controller ────────────────────────────────────────


@contextlib.contextmanager
def device_cgroup(*rules: tuple[str, str], path: str | None = None):
    """A child device cgroup with these (file, rule) writes; yields the
    command prefix that runs a process in it.  Removed afterwards."""
    where = CGROUP_V1 / (path or f"bsc-{uuid.uuid4().hex[:8]}")
    where.mkdir(parents=True)
    try:
        for name, rule in rules:
            (where / name).write_text(rule + "\n")
        join = f'echo $$ > {where}/cgroup.procs && exec "$@"'
        yield ["sh", "-c", join, "sh"]
    finally:
        for leaf in (where, *where.parents):
            if leaf == CGROUP_V1:
                break
            with contextlib.suppress(OSError):
                leaf.rmdir()


needs_cgroup_v1 = pytest.mark.skipif(
    not (CGROUP_V1 / "devices.deny").exists(),
    reason="needs the cgroup v1 devices controller (mounted on this kind of machine)",
)


@needs("sh")
@needs_cgroup_v1
@pytest.mark.parametrize("access", ["rwm", "w"])
def test_a_device_cgroup_that_denies_kvm_is_named(env, access):
    """What classic Docker does to `-v /dev/kvm:/dev/kvm` without --device;
    denying only w is enough, because a VMM opens the node read-write."""
    with device_cgroup(("devices.deny", f"c 10:232 {access}")) as inside:
        out = env.run(inside)
    agrees_with_the_vmm(out, "kvm-device-cgroup")
    message, fix = out["python"]["message"], out["python"]["fix"]
    assert (
        "EPERM (Operation not permitted)" in message and "Device cgroup: devices:/bsc-" in message
    )
    assert "a *:* rwm" in message  # a default-allow list hides its deny rules: said so
    assert "DeviceAllow=" in fix and "--device /dev/kvm" in fix and "linux.resources.devices" in fix


@needs("sh")
@needs_cgroup_v1
def test_a_docker_like_allowlist_without_kvm_is_shown(env):
    allow = ["c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm", "c 5:0 rwm"]
    with device_cgroup(
        ("devices.deny", "a"), *[("devices.allow", rule) for rule in allow]
    ) as inside:
        out = env.run(inside)
    agrees_with_the_vmm(out, "kvm-device-cgroup")
    assert "devices.list allows c 1:3 rwm" in out["native"]["message"]
    assert "not c 10:232 rw" in out["native"]["message"]


@needs("sh", "setpriv")
@needs_cgroup_v1
def test_no_new_privs_is_not_landlock(env):
    """runc and crun set noNewPrivileges; the device cgroup still answers
    EPERM, and EPERM is never Landlock's."""
    with device_cgroup(("devices.deny", "c 10:232 rwm")) as inside:
        out = env.run([*inside, "setpriv", "--no-new-privs"])
    agrees_with_the_vmm(out, "kvm-device-cgroup")
    assert "Landlock" not in out["native"]["message"] + out["native"]["fix"]
    assert "NoNewPrivs" not in out["native"]["fix"]


@needs("sh")
@needs_cgroup_v1
def test_a_services_device_policy_gets_deviceallow(env):
    """A systemd service's cgroup (DevicePolicy=closed keeps /dev/kvm out):
    the unit's own fix, for that unit."""
    unit = f"bsc-{uuid.uuid4().hex[:6]}.service"
    with device_cgroup(
        ("devices.deny", "a"), ("devices.allow", "c 1:3 rwm"), path=f"system.slice/{unit}"
    ) as inside:
        out = env.run(inside)
    agrees_with_the_vmm(out, "kvm-device-cgroup")
    assert f"systemctl edit {unit}" in out["native"]["fix"]
    assert "DeviceAllow=/dev/kvm rw" in out["native"]["fix"]
    assert "--device" not in out["native"]["fix"]


# ── seccomp ─────────────────────────────────────────────────────────────────


@needs("sh")
def test_seccomp_eperm_on_open_is_seccomp_and_never_landlock(env, monkeypatch):
    # openat(..., O_RDWR | O_CLOEXEC) answers EPERM, as Docker's profile
    # answers what it refuses; reading /proc still works.
    extra = (
        SECCOMP_INSTALL
        # openat (257), its flags (args[2], at 32)
        + "\n_install_seccomp(os.O_RDWR | os.O_CLOEXEC, errno.EPERM, nr=257, first=32)"
        + "\nVMM = vmm()\n"
    )
    script = SCRIPT.replace("VMM = vmm()\n", extra, 1)
    monkeypatch.setattr(env, "argv", lambda: [SYSTEM_PYTHON, "-c", script, str(env.app)])
    out = env.run([])
    agrees_with_the_vmm(out, "kvm-seccomp-denied")
    assert out["vmm"] == ["open", "EPERM"]
    text = out["native"]["message"] + out["native"]["fix"]
    assert "Landlock" not in text and "device cgroup" not in text


# ── podman, runc, crun ──────────────────────────────────────────────────────


def host_binds(env: Env) -> list[str]:
    """podman's -v for a rootfs of the host's /usr and /etc, and the module."""
    return ["-v", "/usr:/usr:ro", "-v", "/etc:/etc:ro", "-v", f"{env.app}:{env.app}:ro"]


def podman(env: Env, *args: str) -> list[str]:
    """podman run as root on this host: rlimits it may set, a rootfs of the
    host's /usr and /etc, and (crun refuses hybrid cgroups) no cgroup v2 mount."""
    limits = "--ulimit nofile=1024:1024 --ulimit nproc=1000:1000".split()
    run = ["podman", "run", "--rm", *limits, *host_binds(env), *args, "--rootfs", str(env.rootfs)]
    return private_cgroups(run)


def private_cgroups(command: list[str]) -> list[str]:
    script = f'umount {UNIFIED} 2>/dev/null; exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *command]


@needs("podman", "unshare")
@pytest.mark.parametrize(
    ("args", "cause"),
    [
        (["-v", "/dev/kvm:/dev/kvm"], "kvm-device-cgroup"),
        (["--device", "/dev/kvm"], None),
        ([], "kvm-missing-container"),
    ],
    ids=["bind-mount-only", "device", "nothing"],
)
def test_podman(env, args, cause):
    out = env.run(podman(env, *args))
    agrees_with_the_vmm(out, cause)
    if cause is not None:
        fix = out["native"]["fix"]
        assert "--device /dev/kvm" in fix and "mknod" not in fix
        assert "in a podman container" in out["native"]["message"]


def oci_bundle(env: Env, *, node: bool, allow: bool, bind: bool = False) -> Path:
    """A hand-written OCI config (from `runc spec`) running the script."""
    bundle = env.tmp / "bundle"
    bundle.mkdir(exist_ok=True)
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["root"] = {"path": str(env.rootfs), "readonly": True}
    config["process"].update(args=env.argv(), terminal=False, cwd="/")
    for source in ("/usr", "/etc", str(env.app)):
        config["mounts"].append(
            {"destination": source, "type": "bind", "source": source, "options": ["rbind", "ro"]}
        )
    if bind:
        kvm = {"destination": "/dev/kvm", "type": "bind", "source": "/dev/kvm", "options": ["bind"]}
        config["mounts"].append(kvm)
    if node:
        config["linux"]["devices"] = [
            {"path": "/dev/kvm", "type": "c", "major": 10, "minor": 232, "fileMode": 0o666}
        ]
    if allow:
        rule = {"allow": True, "type": "c", "major": 10, "minor": 232, "access": "rwm"}
        config["linux"]["resources"]["devices"].append(rule)
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


@needs("runc", "crun", "unshare")
@pytest.mark.parametrize("runtime", ["runc", "crun"])
@pytest.mark.parametrize(
    ("node", "allow", "bind", "cause"),
    [
        (True, True, False, None),
        (False, False, True, "kvm-device-cgroup"),
        (True, False, False, "kvm-device-cgroup"),
        (False, False, False, "kvm-missing-container"),
    ],
    ids=["devices-and-allowed", "bind-mounted-only", "node-not-allowed", "nothing"],
)
def test_runc_and_crun_with_hand_written_configs(
    env, monkeypatch, runtime, node, allow, bind, cause
):
    bundle = oci_bundle(env, node=node, allow=allow, bind=bind)
    name = f"bsc-{uuid.uuid4().hex[:8]}"
    command = private_cgroups([runtime, "run", "--bundle", str(bundle), name])
    monkeypatch.setattr(env, "argv", lambda: [])  # the config carries the command
    try:
        out = env.run(command)
    finally:
        subprocess.run([runtime, "delete", "--force", name], capture_output=True)
    agrees_with_the_vmm(out, cause)
    if cause is not None:
        fix = out["native"]["fix"]
        assert "linux.devices" in fix and "linux.resources.devices" in fix, fix


# ── systemd-nspawn, bubblewrap, firejail ────────────────────────────────────


@needs("systemd-nspawn")
@pytest.mark.parametrize(("bind", "cause"), [(False, "kvm-missing-container"), (True, None)])
def test_systemd_nspawn(env, bind, cause):
    command = [
        "systemd-nspawn",
        "-q",
        "--pipe",
        "--link-journal=no",
        "--register=no",
        "--keep-unit",
        "-D",
        str(env.rootfs),
        "--bind-ro=/usr",
        "--bind-ro=/etc",
        f"--bind-ro={env.app}",
    ] + (["--bind=/dev/kvm"] if bind else [])
    out = env.run(command)
    agrees_with_the_vmm(out, cause)
    if cause:
        assert "systemd-nspawn" in out["native"]["message"]
        assert "--bind=/dev/kvm" in out["native"]["fix"] and "--device" not in out["native"]["fix"]


@needs("bwrap")
@pytest.mark.parametrize(
    ("args", "cause"),
    [(["--dev", "/dev"], "kvm-missing-container"), (["--dev-bind", "/dev", "/dev"], None)],
    ids=["private-dev", "dev-bind"],
)
def test_bubblewrap(env, args, cause):
    out = env.run(["bwrap", "--ro-bind", "/", "/", *args, "--proc", "/proc"])
    agrees_with_the_vmm(out, cause)
    if cause:
        assert "--dev-bind /dev/kvm /dev/kvm" in out["python"]["fix"]
        assert "--device" not in out["python"]["fix"]


def with_test_user(env: Env, groups: str | None) -> list[str]:
    """Run as the test user (known only to a bound passwd), holding
    ``groups``, with a /dev/kvm of the test's own: a fresh 10:232 node,
    root:KVM_GID 0660, bound over the path in the private mount namespace.
    The real node's owner and mode are the host's (root:root 0600 on a
    fresh machine, root:kvm 0660 once udev has run), never the test's."""
    node = env.tmp / "kvm"
    if not node.exists():
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(10, 232))
        os.chown(node, 0, KVM_GID)
        os.chmod(node, 0o660)
    (env.tmp / "passwd").write_text(
        Path("/etc/passwd").read_text() + f"boxtest:x:{TEST_UID}:{TEST_GID}::/tmp:/bin/sh\n"
    )
    lines = [
        line
        for line in Path("/etc/group").read_text().splitlines()
        if line.split(":")[0] != "kvm" and line.split(":")[2] != str(KVM_GID)
    ]
    (env.tmp / "group").write_text(
        "\n".join(lines) + f"\nboxtest:x:{TEST_GID}:\nkvm:x:{KVM_GID}:boxtest\n"
    )
    for name in ("passwd", "group"):
        os.chmod(env.tmp / name, 0o644)
    binds = f"mount --bind {node} /dev/kvm"
    binds += (
        f" && mount --bind {env.tmp}/passwd /etc/passwd && mount --bind {env.tmp}/group /etc/group"
    )
    drop = ["setpriv", f"--reuid={TEST_UID}", f"--regid={TEST_GID}"]
    drop += [f"--groups={groups}"] if groups else ["--clear-groups"]
    script = binds + ' && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *drop]


@needs("firejail", "setpriv")
def test_firejails_private_dev_gets_firejails_own_fix(env):
    out = env.run(["firejail", "--quiet"])  # root's profile keeps /dev private
    agrees_with_the_vmm(out, "kvm-missing-container")
    fix = out["native"]["fix"]
    assert "--ignore=private-dev" in fix and "--device" not in fix


@needs("firejail", "setpriv")
def test_firejail_without_a_profile_passes(env):
    agrees_with_the_vmm(env.run(["firejail", "--quiet", "--noprofile"]), None)


@needs("firejail", "setpriv")
def test_firejails_noroot_drops_the_group(env):
    prefix = with_test_user(env, str(KVM_GID)) + ["firejail", "--quiet", "--noprofile", "--noroot"]
    out = env.run(prefix)
    agrees_with_the_vmm(out, "kvm-userns")
    fix = out["python"]["fix"]
    assert "--ignore=noroot" in fix and "usermod" not in fix and "--device" not in fix


# ── User namespaces with nothing mapped ─────────────────────────────────────


@needs("unshare", "setpriv")
@pytest.mark.parametrize("holds_the_group", [True, False])
def test_an_unmapped_user_namespace(env, holds_the_group):
    """`unshare -U` as a user: every id shows as the overflow id, which
    matches nothing; the kernel still checks the real ids."""
    groups = str(KVM_GID) if holds_the_group else None
    out = env.run(with_test_user(env, groups) + ["unshare", "-U"])
    agrees_with_the_vmm(out, None if holds_the_group else "kvm-userns")
    if not holds_the_group:
        message = out["native"]["message"]
        assert "mode lets this process in" not in message
        assert "uid_map: empty (nothing mapped)" in message


# ── Rootless podman ─────────────────────────────────────────────────────────


def rootless_podman(env: Env, *args: str) -> list[str]:
    """podman run as the test user, rootless (subordinate ids from bound
    /etc/subuid and /etc/subgid, storage in a home of its own), with a
    rootfs the user owns, holding the device's group on the host."""
    home, run = env.tmp / "home", env.tmp / "xdg"
    for path in (home, run):
        path.mkdir(mode=0o700)
        os.chown(path, TEST_UID, TEST_GID)
    for name in ("subuid", "subgid"):
        (env.tmp / name).write_text("boxtest:200000:65536\n")
        os.chmod(env.tmp / name, 0o644)
    for path in [env.rootfs, *env.rootfs.rglob("*")]:
        os.chown(path, TEST_UID, TEST_GID, follow_symlinks=False)
    prefix = with_test_user(env, str(KVM_GID))
    binds = prefix[prefix.index("-c") + 1]
    binds = binds.replace(' && exec "$@"', "")
    binds += f" && mount --bind {env.tmp}/subuid /etc/subuid && mount --bind {env.tmp}/subgid /etc/subgid"
    binds += f' && umount {UNIFIED} 2>/dev/null; cd / && exec "$@"'
    prefix[prefix.index("-c") + 1] = binds
    user = [f"HOME={home}", f"XDG_RUNTIME_DIR={run}", "USER=boxtest"]
    podman_run = ["env", *user, "podman", "run", "--rm", "--cgroups=disabled", *host_binds(env)]
    podman_run += ["--device", "/dev/kvm", *args, "--rootfs", str(env.rootfs)]
    return prefix + podman_run


@needs("podman", "newuidmap", "unshare", "setpriv")
@pytest.mark.parametrize(
    ("args", "cause"),
    [([], "kvm-userns"), (["--group-add", "keep-groups"], None)],
    ids=["groups-dropped", "keep-groups"],
)
def test_rootless_podman_drops_the_group_unless_kept(env, args, cause):
    out = env.run(rootless_podman(env, *args), timeout=180)
    agrees_with_the_vmm(out, cause)
    if cause:
        fix = out["native"]["fix"]
        assert "--group-add keep-groups" in fix and "check in this order" in fix
        assert "running as root" not in out["native"]["message"]
