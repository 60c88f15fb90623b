"""Shared fixtures: the module, real-KVM gates and real fault environments."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import boxlite_sdk  # noqa: E402

import boxlite_syscheck  # noqa: E402

SYSTEM_PYTHON = "/usr/bin/python3"
TEST_UID = 4241  # an unprivileged user that exists only in the bound passwd file
TEST_GID = 4241
KVM_GID = 4242  # the device group in the fault environments


def _schema_validator() -> Any:
    import jsonschema

    schema = json.loads((ROOT / "boxlite_syscheck.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    return jsonschema.Draft202012Validator(schema, format_checker=checker)


def valid_document(document: Any) -> Any:
    """The JSON report, after checking it against the shipped schema."""
    errors = sorted(_schema_validator().iter_errors(document), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message[:300]}" for e in errors]
    return document


@pytest.fixture(autouse=True)
def _fresh_caches():
    boxlite_syscheck._reset_caches()
    yield
    boxlite_syscheck._reset_caches()


def _kvm_works() -> str | None:
    """None when /dev/kvm opens here, else the reason it does not."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.uname().machine not in boxlite_syscheck._SMOKE_MACHINES:
        return f"no smoke test for {os.uname().machine}"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return f"/dev/kvm does not open: {err}"
    os.close(fd)
    return None


KVM_REASON = _kvm_works()
needs_kvm = pytest.mark.skipif(KVM_REASON is not None, reason=f"needs KVM: {KVM_REASON}")


def _root_reason() -> str | None:
    if KVM_REASON is not None:
        return f"needs KVM: {KVM_REASON}"
    if os.geteuid() != 0:
        return "needs root for unshare/mknod/setpriv"
    for tool in ("unshare", "setpriv", "mount", "mknod"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"needs {SYSTEM_PYTHON} (readable by other users)"
    return None


ROOT_REASON = _root_reason()

# This development host: KVM from kvm_pvm, stock guests' kernel code emulated.
PVM_HOST = os.path.exists("/sys/module/kvm_pvm") and KVM_REASON is None
on_pvm_host = pytest.mark.skipif(not PVM_HOST, reason="needs a kvm_pvm host (guest code emulated)")
needs_root = pytest.mark.skipif(ROOT_REASON is not None, reason=ROOT_REASON or "")


def _tool_reason(*tools: str) -> str | None:
    if KVM_REASON is not None:
        return f"needs KVM: {KVM_REASON}"
    if os.geteuid() != 0:
        return "needs root to build the real environments"
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (the Debian packages .ci/run installs)"
    return None


def needs(*tools: str) -> pytest.MarkDecorator:
    """Skip, with the reason, where a tool cannot run here; under CI, which
    installs them, never: a missing tool fails the test."""
    reason = None if os.environ.get("CI") else _tool_reason(*tools)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


@pytest.fixture(params=["native", "python"])
def backend(request):
    """Each smoke-test backend in turn; the native one must be built."""
    if request.param == "native" and not (ROOT / "libkvmsmoke.so").exists():
        pytest.fail("libkvmsmoke.so is not built: run `make` (make test does)")
    return request.param


@pytest.fixture
def kvm_fd():
    if KVM_REASON is not None:
        pytest.skip(f"needs KVM: {KVM_REASON}")
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)


# The end of every script that checks an environment: the gate with both
# backends, then check() and the CLI's JSON, whose causes must be the gate's
# (one door to the diagnosis).  Prints one JSON line; ENGINE is set first.
CHECK_EVERY_DOOR = r"""
import contextlib, io, json
out = {}
for backend in ("native", "python"):
    try:
        with b.SystemCheck.run(backend=backend, engine=ENGINE) as host:
            out[backend] = {"ok": True, "cause": None, "backend": host.smoke.backend,
                            "outcome": list(map(str, b._outcome(host.smoke)))}
    except b.BoxliteError as err:
        out[backend] = {"ok": False, "type": type(err).__name__, "cause": err.cause,
                        "message": str(err), "fix": err.fix}
report = b.check(engine=ENGINE)
out["report"] = report.error.cause if report.error else None
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    code = b.main(["--json", "--engine", ENGINE or "none"])
cli = json.loads(printed.getvalue())
out["cli"] = {"exit": code, "cause": (cli["error"] or {}).get("cause"), "document": cli}
b._wait_for_closes()
print(json.dumps(out))
"""

# Runs inside the fault environment.
PROBE_SCRIPT = (
    r"""
import sys
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
ENGINE = None if sys.argv[2] == "none" else sys.argv[2]
"""
    + CHECK_EVERY_DOOR
)


def every_door_agrees(out: dict[str, Any]) -> None:
    """The gate (both backends), check() and the CLI name one cause."""
    gate = out["native"]["cause"]
    assert out["python"]["cause"] == gate, out
    assert out["report"] == gate, out
    assert out["cli"]["cause"] == gate, out
    assert out["cli"]["exit"] == (0 if gate is None else 1), out
    valid_document(out["cli"]["document"])


class FaultEnv:
    """A private mount namespace with a chosen /dev/kvm, users and groups.

    Devices and mounts change only inside ``unshare -m``; the real /dev/kvm
    is never touched.  The module and native library are copied to a
    directory every user can read.
    """

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        shutil.copy(ROOT / "boxlite_syscheck.py", workdir)
        lib = ROOT / "libkvmsmoke.so"
        if lib.exists():
            shutil.copy(lib, workdir)
        self.setup: list[str] = []
        self.group_members = ""

    def kvm_node(self, *, uid: int = 0, gid: int = KVM_GID, mode: int = 0o660) -> None:
        """Bind a fresh KVM character device (10:232) over /dev/kvm."""
        node = self.dir / "kvm"
        os.mknod(node, 0o600 | 0o020000, os.makedev(10, 232))
        os.chown(node, uid, gid)
        os.chmod(node, mode)
        self.setup.append(f"mount --bind {node} /dev/kvm")

    def no_kvm(self) -> None:
        """A /dev with no kvm node: a tmpfs over /dev, keeping /dev/null."""
        self.setup += ["mount -t tmpfs -o mode=755 none /dev", "mknod -m 666 /dev/null c 1 3"]

    def passwd_and_group(self, members: str = "") -> None:
        """Bind passwd/group files that know the test user and the kvm group."""
        passwd = Path("/etc/passwd").read_text() + f"boxtest:x:{TEST_UID}:{TEST_GID}::/:/bin/sh\n"
        group = Path("/etc/group").read_text()
        group += f"boxtest:x:{TEST_GID}:\nkvmtest:x:{KVM_GID}:{members}\n"
        (self.dir / "passwd").write_text(passwd)
        (self.dir / "group").write_text(group)
        os.chmod(self.dir / "passwd", 0o644)
        os.chmod(self.dir / "group", 0o644)
        self.setup += [
            f"mount --bind {self.dir}/passwd /etc/passwd",
            f"mount --bind {self.dir}/group /etc/group",
        ]

    def run(
        self,
        code: str,
        *args: str,
        user: bool = False,
        groups: str | None = None,
        python: str = SYSTEM_PYTHON,
        userns: bool = False,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run Python code inside the namespace, as root or as the test user.

        ``userns`` runs it as root of a new user namespace (``unshare -U -r``),
        made by the test user when ``user`` is set: a rootless container.
        """
        command = [python, "-c", code, str(self.dir), *args]
        if userns:
            command = ["unshare", "-U", "-r", *command]
        if env:
            command = ["env", *(f"{k}={v}" for k, v in env.items()), *command]
        if user:
            drop = ["setpriv", f"--reuid={TEST_UID}", f"--regid={TEST_GID}"]
            drop += [f"--groups={groups}"] if groups else ["--clear-groups"]
            command = drop + command
        script = " && ".join(self.setup + ['exec "$@"']) if self.setup else 'exec "$@"'
        return subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *command],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )

    def node_at(
        self,
        where: str,
        *,
        major: int = 10,
        minor: int = 232,
        mode: int = 0o666,
        uid: int = 0,
        gid: int = KVM_GID,
    ) -> None:
        """Make a character device at a path of the namespace (e.g. on a nodev tmpfs)."""
        self.setup.append(f"mknod -m {mode:o} {where} c {major} {minor}")
        self.setup.append(f"chown {uid}:{gid} {where}")

    def probe(self, engine: str = "none", **kwargs: object) -> dict[str, dict[str, object]]:
        """Run SystemCheck.run() with both backends; return what each gave.

        The bare device check (engine "none") by default: these environments
        change how the device is reached, not what KVM can run.
        """
        done = self.run(PROBE_SCRIPT, engine, **kwargs)  # type: ignore[arg-type]
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        every_door_agrees(result)
        return result


@pytest.fixture
def fault_env():
    if ROOT_REASON is not None:
        pytest.skip(ROOT_REASON)
    workdir = Path(tempfile.mkdtemp(prefix="boxlite-syscheck-"))
    os.chmod(workdir, 0o755)
    try:
        yield FaultEnv(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# Installs a seccomp filter in the process that runs it: on x86_64, ioctl(2)
# whose request is REQUEST (and, when ARG >= 0, whose third argument is ARG)
# fails with ERRNO (0: "succeeds" and returns 0).  Raw BPF through ctypes:
# seccomp_data is nr (0), arch (4), ip (8), args[6] (16 + 8 * i).
SECCOMP_INSTALL = r"""
import ctypes, struct
# Refuse an ioctl (args[1] == request), or with nr and first another system
# call whose argument at that offset is request (args[0] is at 16).
def _install_seccomp(request, errno_value, arg=-1, nr=16, first=24):
    def stmt(code, k): return struct.pack("HBBI", code, 0, 0, k)
    def jeq(k, jt, jf): return struct.pack("HBBI", 0x15, jt, jf, k)
    deny = stmt(0x06, 0x00050000 | errno_value)   # SECCOMP_RET_ERRNO | errno
    allow = stmt(0x06, 0x7FFF0000)                # SECCOMP_RET_ALLOW
    body = [stmt(0x20, 4), jeq(0xC000003E, 0, 5 if arg < 0 else 7),  # AUDIT_ARCH_X86_64
            stmt(0x20, 0), jeq(nr, 0, 3 if arg < 0 else 5),          # the call (ioctl)
            stmt(0x20, first), jeq(request, 0, 1 if arg < 0 else 3)] # its argument, low word
    if arg >= 0:
        body += [stmt(0x20, 32), jeq(arg, 0, 1)]                     # args[2], low word
    prog = b"".join(body + [deny, allow])
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(prog)
    fprog = struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
    assert libc.prctl(38, 1, 0, 0, 0) == 0                       # PR_SET_NO_NEW_PRIVS
    assert libc.syscall(317, 1, 0, ctypes.c_char_p(fprog)) == 0  # SECCOMP_SET_MODE_FILTER
"""


def run_script(
    code: str, *args: str, timeout: float = 60, python: str = sys.executable
) -> subprocess.CompletedProcess[str]:
    """Run Python code in a fresh interpreter with the module importable."""
    return subprocess.run(
        [python, "-c", code, str(ROOT), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def run_json():
    """Run a script in a fresh interpreter; it must exit 0, and its last line
    is JSON, which is returned."""

    def run(code: str, *args: str, **kwargs: Any) -> Any:
        done = run_script(code, *args, **kwargs)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run


def process_state() -> dict[str, object]:
    """What the check must leave as it found it."""
    import signal as sig

    handlers = {
        s: sig.getsignal(s) for s in sig.valid_signals() if s not in (sig.SIGKILL, sig.SIGSTOP)
    }
    return {
        "mask": sig.pthread_sigmask(sig.SIG_BLOCK, []),
        "pending": sig.sigpending(),
        "handlers": handlers,
        "timers": Path("/proc/self/timers").read_text(),
        "fds": sorted(os.listdir("/proc/self/fd")),
    }


# "jmp $" (EB FE): a real-mode guest that never halts, for the bound's tests.
SPIN = b"\xeb\xfe"


def spin(fd: int, backend: str | None = None, timeout: float = 0.3) -> Any:
    """Run a guest that never stops, bounded by ``timeout``."""
    return boxlite_syscheck._run_program(
        fd, boxlite_syscheck._real_mode_guest(SPIN), timeout, backend
    )


# A KVM node as Evidence records it: root:kvm 0660, the group the fault
# environments give their node.
KVM_NODE = {
    "kind": "character device",
    "major": 10,
    "minor": 232,
    "uid": 0,
    "gid": KVM_GID,
    "mode": 0o660,
    "owner": "root",
    "group": "kvm",
}


def evidence(**fields: Any) -> Any:
    """A user's view of a good Intel host, as Evidence (nothing read from
    this machine); each test changes what it is about."""
    base = dict(
        euid=1000,
        groups=(1000,),
        user="alice",
        node=dict(KVM_NODE),
        arch="x86_64",
        cpu_flags={"vmx"},
        vendor="GenuineIntel",
        kvm_modules=["kvm"],
        kernel="6.1.0-amd64",
        userns={"identity": True},
        group_named=True,
        group_listed=False,
        kvm_group=True,
        bind_mounted=False,
        mount={
            "point": "/dev",
            "fstype": "devtmpfs",
            "options": ["rw"],
            "root": "/",
            "source": "udev",
        },
    )
    base.update(fields)
    return boxlite_syscheck.Evidence(gather=False, **base)


def diagnose(result: Any, *, engine: str | None = "libkrun", provider: str = "kvm_amd") -> Any:
    """The cause the rules name for a guest's result on a host whose KVM
    comes from ``provider`` (evidence given, nothing read from this host)."""
    b = boxlite_syscheck
    machine = "aarch64" if result.guest == "aarch64" else "x86_64"
    ev = b.Evidence(
        gather=False,
        kvm_provider=provider,
        kvm_modules=[provider, "kvm"],
        kernel="6.1.0",
        node=dict(KVM_NODE),
        euid=0,
        groups=(0,),
    )
    facts = b.Facts(
        "linux", machine, engine=engine if result.guest == "long-mode" else None, evidence=ev
    )
    facts.smoke = result
    return b._diagnose(facts)


def boxlite_venv(version: str) -> Path:
    """A virtualenv of the system Python (every user can run it) with the
    real BoxLite SDK from PyPI, made once per machine and version.  Skips
    with the reason only where PyPI cannot be reached; under CI it fails."""
    try:
        return boxlite_sdk.venv(version)
    except boxlite_sdk.Unavailable as err:
        if os.environ.get("CI"):
            pytest.fail(str(err))
        pytest.skip(str(err))


def boxlite_kernel() -> Path:
    """The kernel BoxLite boots: the libkrunfw its runtime extracts."""
    try:
        return boxlite_sdk.extracted_libkrunfw()
    except boxlite_sdk.Unavailable as err:
        if os.environ.get("CI"):
            pytest.fail(str(err))
        pytest.skip(str(err))


def busybox_oci_layout(where: Path) -> Path:
    """A one-layer busybox OCI image layout (tests/boxlite_sdk.py makes it)."""
    try:
        return boxlite_sdk.busybox_oci_layout(where)
    except boxlite_sdk.Unavailable as missing:
        pytest.fail(str(missing))
