"""The real client: BoxLite's SDK in the loop, its real errors diagnosed right.

The SDK (boxlite 0.10.8, and 0.9.1 where it helps) comes from PyPI into a
virtualenv of the system Python (tests/conftest.py: boxlite_venv); a box
starts from a one-layer busybox OCI layout with no network.  The texts in
the unit tests below are what those versions really print
(../shared/research/real-runtimes.md), each seen on this machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import (
    KVM_GID,
    PVM_HOST,
    ROOT,
    ROOT_REASON,
    TEST_UID,
    boxlite_venv,
    busybox_oci_layout,
    needs_root,
)

import boxlite_syscheck as b

# ── Reading the error first: the texts BoxLite really gives ─────────────────


class SDKError(Exception):
    """Stands in for a boxlite.errors class: its name and code are what count."""

    code: str | None = None


def sdk_error(name: str, code: str | None, text: str) -> BaseException:
    return type(name, (SDKError,), {"code": code})(text)


class PanicException(BaseException):
    """pyo3_runtime.PanicException is a BaseException, not an Exception."""


@pytest.mark.parametrize(
    ("error", "host"),
    [
        (
            sdk_error(
                "EngineError",
                "engine_unavailable",
                "engine reported an error: The VM failed to start.",
            ),
            True,
        ),
        (
            sdk_error(
                "UnsupportedError", "unsupported", "unsupported: KVM is not available on this host."
            ),
            True,
        ),
        (
            sdk_error(
                "UnsupportedError",
                "unsupported",
                "unsupported: KVM is available but access is denied for the current user.",
            ),
            True,
        ),
        (
            sdk_error(
                "StorageError", "storage_error", "storage error: Rootfs path does not exist: /tmp/x"
            ),
            False,
        ),
        (
            sdk_error(
                "StorageError",
                "storage_error",
                "storage error: Failed to initialize filesystem at /x: storage error: failed to create home: No such file or directory (os error 2)",
            ),
            False,
        ),
        (
            RuntimeError(
                "storage error: Failed to pull image 'debian:bookworm-slim' after trying 1 registry"
            ),
            False,
        ),
        (
            RuntimeError(
                "unsupported: KVM is available but access is denied for the current user."
            ),
            True,
        ),
        (RuntimeError("engine reported an error: Error creating the Kvm object: Error(13)"), True),
        (
            PanicException(
                "Failed to initialize BoxliteRuntime:\n\nunsupported: KVM is not available on this host."
            ),
            True,
        ),
        (
            PanicException(
                'initializing rolling file appender failed: InitError { context: "failed to create log file", source: Os { code: 13, kind: PermissionDenied } }'
            ),
            False,
        ),
        (sdk_error("TimeoutError", None, "timed out waiting for the guest agent"), False),
        (
            sdk_error(
                "ConfigError",
                "config_error",
                "configuration error: The sandbox could not be initialized on this host.",
            ),
            False,
        ),
        (sdk_error("ImageError", "image_pull_failed", "images error: manifest unknown"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_the_error_is_read_before_the_host(error, host):
    assert b._host_fault(error) is host


@pytest.mark.parametrize(
    ("message", "decoded"),
    [
        (
            "[2026-12-02T09:22:44Z ERROR krun_vmm::linux::vstate] Received KVM_EXIT_INTERNAL_ERROR signal",
            "the engine's vCPU stopped with KVM_EXIT_INTERNAL_ERROR",
        ),
        (
            "kvm-pvm: INTERNAL_ERROR in batch emul: rip=0xffffffff812a7652",
            "kvm_pvm's instruction emulator failed (INTERNAL_ERROR) at guest RIP 0xffffffff812a7652",
        ),
        ("Error creating the Kvm object: Error(13)", "errno 13 is EACCES (Permission denied)"),
        (
            "failed to create home: No such file or directory (os error 2)",
            "errno 2 is ENOENT (No such file or directory)",
        ),
        (
            "unsupported: KVM is not available on this host.",
            "BoxLite's own check found no usable /dev/kvm",
        ),
        ("Missing KVM capabilities: SetTssAddr", "KVM_CAP_SET_TSS_ADDR (4) is missing"),
    ],
)
def test_what_boxlite_writes_is_decoded(message, decoded):
    assert decoded in b.decode_engine_message(message)


def test_an_error_that_is_not_the_hosts_comes_back_unchanged(mocker):
    gate = mocker.spy(b.KvmProbe, "gate")
    error = sdk_error(
        "StorageError", "storage_error", "storage error: Rootfs path does not exist: /x"
    )
    assert b.KvmProbe("x86_64").diagnose_create_failure(error) is error
    assert gate.call_count == 0  # the host is not even checked


def test_a_panic_is_taken_and_typed_as_a_base_exception(mocker):
    mocker.patch.object(b, "_open_device", side_effect=FileNotFoundError(2, "gone"))
    panic = PanicException(
        "Failed to initialize BoxliteRuntime:\n\nunsupported: KVM is not available on this host."
    )
    precise = b.KvmProbe("x86_64").diagnose_create_failure(panic)
    assert isinstance(precise, b.UnsupportedError) and precise.__cause__ is panic


def test_a_host_that_passes_and_a_message_with_nothing_to_decode_keeps_the_error(mocker):
    # A host that passes every stage: the gate's last question is the decoding.
    def passes(self, engine, timeout, backend, facts):
        facts.complete = True
        return facts, None, b._diagnose(facts)

    mocker.patch.object(b.KvmProbe, "gate", passes)
    said = sdk_error(
        "EngineError", "engine_unavailable", "engine reported an error: The VM failed to start."
    )
    assert b.KvmProbe("x86_64").diagnose_create_failure(said) is said
    logged = b.KvmProbe("x86_64").diagnose_create_failure(
        said, log="Received KVM_EXIT_SHUTDOWN signal"
    )
    assert logged.cause == "engine-error-decoded" and logged.__cause__ is said
    assert "KVM_EXIT_SHUTDOWN" in str(logged) and logged.code == "engine_unavailable"


def test_a_host_cause_comes_before_the_decoded_message():
    # The decoding is the gate's last question: a guest that failed names
    # the cause, whatever the engine's message decodes to.
    facts = b.Facts(evidence=b.Evidence(gather=False, kvm_provider="kvm_pvm"))
    facts.smoke = b.SmokeResult("native", guest="long-mode")
    facts.smoke.step = b.STEP_DONE
    facts.smoke.speed = b.Speed(1400.0, 0.3, 1024)  # about 4,700x the host
    facts.decoded = ["KVM_EXIT_INTERNAL_ERROR"]
    facts.complete = True
    assert b._diagnose_staged(facts).cause == "guest-emulated-pvm"
    facts.smoke = None
    assert b._diagnose_staged(facts).cause == "engine-error-decoded"


# ── The real SDK ────────────────────────────────────────────────────────────

SDK_SCRIPT = r"""
import asyncio, glob, json, os, sys
sys.path.insert(0, sys.argv[1])
import boxlite
import boxlite_syscheck as b

what, home, rootfs, engine = sys.argv[2:6]


async def attempt():
    if what == "default":
        boxlite.Boxlite.default()
        return
    runtime = boxlite.Boxlite(boxlite.Options(home_dir=home))
    if what == "runtime":
        return
    options = boxlite.BoxOptions(rootfs_path=rootfs, cpus=1, memory_mib=256, auto_remove=True)
    box = await runtime.create(options)
    await box.start()
    await box.exec("echo", ["hello"])


try:
    asyncio.run(attempt())
    raised = None
except BaseException as err:  # pyo3's PanicException is a BaseException
    raised = err
out = {"raised": None}
if raised is not None:
    log = "".join(open(path).read() for path in glob.glob(home + "/logs/boxlite.log.*"))
    got = b.diagnose_create_failure(raised, engine=None if engine == "none" else engine, log=log)
    out = {
        "raised": [type(raised).__name__, getattr(raised, "code", None), str(raised)],
        "same": got is raised,
        "chained": got.__cause__ is raised,
        "type": type(got).__name__,
        "cause": getattr(got, "cause", None),
        "code": getattr(got, "code", None),
        "message": str(got),
        "fix": getattr(got, "fix", ""),
    }
print(json.dumps(out), flush=True)
# BoxLite's runtime can abort while the interpreter tears it down (SIGABRT
# at exit, seen with 0.10.8 after a failed box): leave without teardown.
os._exit(0)
"""


@pytest.fixture(scope="module")
def sdk():
    if ROOT_REASON is not None:
        pytest.skip(ROOT_REASON)
    return boxlite_venv("0.10.8") / "bin" / "python"


@pytest.fixture
def workdir():
    where = Path(tempfile.mkdtemp(prefix="bsc-sdk-"))
    os.chmod(where, 0o755)
    try:
        yield where
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(where)], check=False)


def run_sdk(python, what, home, rootfs="", engine="libkrun", module=ROOT, env=None):
    done = subprocess.run(
        [str(python), "-c", SDK_SCRIPT, str(module), what, str(home), str(rootfs), engine],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(lines[-1])


@pytest.mark.skipif(not PVM_HOST, reason="needs this kind of host: kvm_pvm, guest code emulated")
def test_a_real_box_dies_here_and_the_cause_is_the_emulation(sdk, workdir):
    out = run_sdk(sdk, "box", workdir / "home", busybox_oci_layout(workdir / "oci"))
    assert out["raised"][:2] == ["EngineError", "engine_unavailable"], out
    assert "The VM failed to start" in out["raised"][2]
    assert out["cause"] == "guest-emulated-pvm" and out["chained"], out
    assert out["type"] == "UnsupportedError" and out["code"] == "unsupported"
    assert "PVM-enabled guest kernel" in out["fix"]


def test_a_missing_rootfs_is_not_the_hosts_fault(sdk, workdir):
    out = run_sdk(sdk, "box", workdir / "home", workdir / "no-such-rootfs")
    assert out["raised"][:2] == ["StorageError", "storage_error"], out
    assert "Rootfs path does not exist" in out["raised"][2]
    assert out["same"], out  # unchanged: never "guest code is emulated"


@pytest.mark.parametrize("engine", ["none", "libkrun"])
def test_a_home_dir_that_cannot_exist_is_not_the_hosts_fault(sdk, engine):
    out = run_sdk(sdk, "runtime", "/proc/no-such/home", engine=engine)
    assert out["raised"][0] == "StorageError" and "(os error 2)" in out["raised"][2], out
    assert out["same"], out


def runtime_as_a_user_without_the_group(python, fault_env):
    """The SDK's runtime, built as the test user on a node of group kvmtest."""
    fault_env.passwd_and_group(members="")
    fault_env.kvm_node(mode=0o660)
    home = fault_env.dir / "home"
    home.mkdir()
    os.chown(home, TEST_UID, TEST_UID)
    args = (SDK_SCRIPT, "runtime", str(home), "", "libkrun")
    done = fault_env.run(*args, user=True, python=str(python), env={"HOME": str(home)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_user_without_the_group_gets_the_group_cause(sdk, fault_env):
    out = runtime_as_a_user_without_the_group(sdk, fault_env)
    assert out["raised"][:2] == ["UnsupportedError", "unsupported"], out
    assert "access is denied" in out["raised"][2]
    assert out["cause"] == "kvm-not-in-group" and out["chained"], out
    assert "usermod -aG kvmtest boxtest" in out["fix"]


def test_a_group_without_a_name_gets_commands_that_work(sdk, fault_env):
    """uid 65534 on a node whose group 4242 has no name: never `usermod -aG 4242`."""
    fault_env.kvm_node(mode=0o660, gid=KVM_GID + 7)  # a gid no group file names
    home = fault_env.dir / "home"
    home.mkdir(mode=0o777)
    command = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        str(sdk),
        "-c",
        SDK_SCRIPT,
        str(fault_env.dir),
        "runtime",
        str(home),
        "",
        "libkrun",
    ]
    setup = " && ".join(fault_env.setup + ['exec "$@"'])
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", setup, "sh", *command],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(home)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["cause"] == "kvm-not-in-group", out
    fix = out["fix"]
    assert f"usermod -aG {KVM_GID + 7}" not in fix
    assert f"groupadd --gid {KVM_GID + 7} kvm" in fix and "usermod -aG kvm nobody" in fix


def test_a_private_dev_through_boxlite_default_is_a_panic_diagnosed(sdk, fault_env):
    fault_env.no_kvm()
    home = fault_env.dir / "home"
    home.mkdir()
    done = fault_env.run(
        SDK_SCRIPT, "default", str(home), "", "libkrun", python=str(sdk), env={"HOME": str(home)}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["raised"][0] == "PanicException", out
    assert "KVM is not available on this host" in out["raised"][2]
    assert out["cause"] == "kvm-missing-container" and out["chained"], out
    assert "mknod" not in out["fix"]


def test_an_unrelated_panic_is_not_the_hosts_fault(sdk, workdir):
    # Boxlite.default() whose log file cannot be made: a panic, not a host fault.
    home = workdir / "home"
    home.mkdir()
    (home / ".boxlite").write_text("a file where BoxLite wants its home")
    out = run_sdk(sdk, "default", home, env={"HOME": str(home)})
    assert out["raised"][0] == "PanicException", out
    assert out["same"], out


def test_the_sdk_codes_are_ours(sdk):
    code = (
        "import json, boxlite.errors as e; print(json.dumps({n: getattr(e, n).code for n in "
        "e.__all__ if isinstance(getattr(getattr(e, n), 'code', None), str)}))"
    )
    theirs = json.loads(
        subprocess.run([str(sdk), "-c", code], capture_output=True, text=True, check=True).stdout
    )
    ours = {cls.__name__: cls.code for cls in b.BoxliteError.__subclasses__() if cls.code}
    shared = set(theirs) & set(ours)
    assert len(shared) >= 15, shared
    assert {name: ours[name] for name in shared} == {name: theirs[name] for name in shared}


@pytest.fixture(scope="module")
def sdk_091():
    if ROOT_REASON is not None:
        pytest.skip(ROOT_REASON)
    return boxlite_venv("0.9.1") / "bin" / "python"


def test_boxlite_091s_runtime_errors_are_read_too(sdk_091, workdir, fault_env):
    # 0.9.1 always pulls its guest image: offline, a storage error, not the host's.
    out = run_sdk(sdk_091, "box", workdir / "home", busybox_oci_layout(workdir / "oci"))
    assert out["raised"][0] == "RuntimeError" and "Failed to pull image" in out["raised"][2], out
    assert out["same"], out
    out = runtime_as_a_user_without_the_group(sdk_091, fault_env)
    assert out["raised"][0] == "RuntimeError" and out["raised"][2].startswith("unsupported: "), out
    assert out["cause"] == "kvm-not-in-group" and out["code"] == "unsupported", out


# ── The README's integration recipe, as written ─────────────────────────────


@needs_root
def test_the_readme_recipe_runs_with_the_real_sdk(sdk, workdir):
    text = (ROOT / "README.md").read_text()
    recipe = re.search(r"<!-- recipe -->\n```python\n(.*?)```", text, re.S)
    assert recipe, "the README's integration recipe"
    script = workdir / "recipe.py"
    script.write_text(recipe.group(1))
    oci = busybox_oci_layout(workdir / "oci")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(workdir), "ROOTFS": str(oci)}
    done = subprocess.run(
        [str(sdk), str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    if PVM_HOST:  # the gate refuses here, before the runtime is built, with the cause
        assert done.returncode == 1, done.stdout + done.stderr
        assert "guest-emulated-pvm" in done.stdout + done.stderr
    else:
        assert done.returncode == 0, done.stdout + done.stderr
