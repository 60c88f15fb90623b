"""The report and the command line, through main() and through python -m."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import KVM_NODE, ROOT, needs, needs_kvm, on_pvm_host, valid_document

import boxlite_syscheck as b


def check_shape(report):
    """The shipped JSON Schema, and the fix said once."""
    valid_document(report)
    if report["error"] is not None:
        assert report["error"]["fix"] not in report["error"]["message"]


@on_pvm_host
def test_real_report_on_this_pvm_host_is_not_usable_with_one_cause():
    report = b.check()
    assert report.verdict == "not-usable"
    assert report.error is not None and report.error.cause == "guest-emulated-pvm"
    found = {f.id: f for f in report.findings}
    # The device layer passes: /dev/kvm works.
    assert found["kvm.device"].status == "pass"
    assert found["kvm.smoke"].status == "pass"
    assert found["kvm.smoke"].evidence["runs"] > 0
    assert found["kvm.capabilities"].evidence["USER_MEMORY"] == {"number": 3, "value": 1}
    # The real-guest layers say why no real guest runs, with one fix.
    assert found["guest.speed"].status == "fail" and found["guest.speed"].error is report.error
    assert found["guest.speed"].evidence["ratio"] >= b.EMULATION_RATIO
    assert found["guest.stock_kernel"].status == "fail"
    assert found["guest.stock_kernel"].error is None and not found["guest.stock_kernel"].fix
    assert "lock cmpxchg16b" in found["guest.stock_kernel"].summary
    assert "kvm_pvm" in found["kvm.module"].summary
    if (
        found["cpu.flags"].evidence.get("vmx") is False
        and found["cpu.flags"].evidence.get("svm") is False
    ):
        assert "right verdict for the wrong reason" in found["cpu.flags"].summary


@needs_kvm
def test_report_with_engine_none_checks_the_device_only():
    report = b.check(engine=None)
    assert report.verdict == "usable", [f for f in report.findings if f.status != "pass"]
    assert report.host["engine"] == "none"  # as every other format says it
    assert not [f for f in report.findings if f.id.startswith("guest.")]


@on_pvm_host
def test_main_prints_the_report_and_the_one_fix(capsys):
    assert b.main([]) == 1
    out = capsys.readouterr().out
    assert "PASS  kvm.smoke" in out and "FAIL  guest.speed" in out
    assert out.count("Fix: ") == 1 and "PVM-enabled guest kernel" in out
    assert out.rstrip().endswith("Verdict: not-usable")
    assert "\x1b[" not in out  # not a terminal: no colour


@needs_kvm
def test_main_with_engine_none_exits_0(capsys):
    assert b.main(["--engine", "none"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("Verdict: usable")


@needs_kvm
def test_main_json_has_the_documented_shape(capsys):
    b.main(["--json", "--backend", "python"])
    report = json.loads(capsys.readouterr().out)
    check_shape(report)
    smoke = next(f for f in report["findings"] if f["id"] == "kvm.smoke")
    assert smoke["evidence"]["backend"] == "python"
    speed = next(f for f in report["findings"] if f["id"] == "guest.speed")
    assert set(speed["evidence"]) >= {"guest_ns_per_iteration", "host_ns_per_iteration", "ratio"}


@needs_kvm
def test_quiet_prints_nothing_when_usable(capsys):
    assert b.main(["--quiet", "--engine", "none"]) == 0
    assert capsys.readouterr().out == ""


def failing_open(mocker):
    mocker.patch.object(b, "_PROBE", b.KvmProbe("x86_64"))
    mocker.patch.object(b, "_open_device", side_effect=OSError(errno.EPERM, "denied"))


def test_not_usable_exits_1_and_shows_the_fix(mocker, capsys):
    failing_open(mocker)
    assert b.main([]) == 1
    out = capsys.readouterr().out
    assert "FAIL  kvm.smoke" in out
    assert "Fix: check in this order: (1) the audit log" in out
    assert "EPERM (Operation not permitted)" in out
    assert out.rstrip().endswith("Verdict: not-usable")


def test_quiet_prints_only_failures(mocker, capsys):
    failing_open(mocker)
    assert b.main(["-q"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "PASS" not in out and "INFO" not in out


def test_colour_only_on_a_terminal_without_no_color(mocker, capsys, monkeypatch):
    failing_open(mocker)
    mocker.patch.object(sys.stdout, "isatty", return_value=True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    b.main([])
    assert "\x1b[31m" in capsys.readouterr().out
    monkeypatch.setenv("NO_COLOR", "1")
    b.main([])
    assert "\x1b[" not in capsys.readouterr().out


def reporting(mocker, *findings, error=None):
    """main() renders this report (a value, as check() would return it)."""
    host = {
        "host": "h",
        "system": "Linux",
        "kernel": "6.1",
        "machine": "x86_64",
        "python": "3.11",
        "probe": "kvm",
        "engine": "libkrun",
        "kvm_provider": "kvm_amd",
    }
    mocker.patch.object(b, "check", return_value=b.Report(list(findings), error, host))


def test_strict_turns_warnings_into_failure(mocker):
    reporting(mocker, b.Finding("x.warn", "warn", "a warning", fix="do it"))
    assert b.main(["--quiet"]) == 0
    assert b.main(["--quiet", "--strict"]) == 1


@pytest.mark.parametrize(
    "argv", [["--bogus"], ["--timeout", "0"], ["--timeout", "x"], ["--backend", "rust"]]
)
def test_usage_errors_exit_2(argv, capsys):
    assert b.main(argv) == 2
    assert capsys.readouterr().err


def test_version(capsys):
    assert b.main(["--version"]) == 0
    assert b.__version__ in capsys.readouterr().out


def test_checker_failure_exits_3(mocker, capsys):
    mocker.patch.object(b, "check", side_effect=RuntimeError("bug"))
    assert b.main([]) == 3
    assert "the checker failed" in capsys.readouterr().err


def test_checker_failure_in_json_is_a_document_without_a_verdict(mocker, capsys):
    # What check() raises for its own failure: InternalError, never a verdict.
    internal = b._as_checker_fault(MemoryError("no memory for the report"))
    mocker.patch.object(b, "check", side_effect=internal)
    assert b.main(["--json"]) == 3
    captured = capsys.readouterr()
    document = valid_document(json.loads(captured.out))
    assert document["check_success"] is False and document["verdict"] is None
    assert document["error"]["cause"] == "checker-failed"
    assert "MemoryError: no memory for the report" in document["error"]["message"]
    assert document["host"]["engine"] == "libkrun" and document["findings"] == []
    assert "the checker failed" in captured.err


def test_linux_findings_through_seams(mocker):
    probe = b.KvmProbe("x86_64")
    mocker.patch.object(b, "_stat", side_effect=OSError(errno.ENOENT, "gone"))
    mocker.patch.object(b, "_open_device", side_effect=OSError(errno.ENOENT, "gone"))
    mocker.patch.object(b, "_exists", return_value=False)
    mocker.patch.object(b, "_read_text", return_value=None)
    facts = probe.gather("libkrun", 1.0, None)
    error = b._diagnose_staged(facts)
    found = {f.id: f for f in probe.findings(facts, error)}
    # One cause, one failing finding, and it carries the fix.
    assert found["kvm.device"].status == "fail" and found["kvm.device"].fix
    assert found["kvm.smoke"].status == "skip"
    assert found["kvm.capabilities"].status == "skip"
    assert found["kvm.groups"].status == "skip"
    assert found["kvm.module"].status == "skip"  # no /sys/module
    assert found["cpu.flags"].status == "skip"  # no /proc/cpuinfo
    assert found["host.context"].status == "info"


def groups_finding(**fields):
    base = dict(
        euid=1000,
        groups=(1000,),
        user="alice",
        node=dict(KVM_NODE),
        group_listed=False,
        userns={"identity": True},
    )
    ev = b.Evidence(gather=False, **{**base, **fields})
    return b._groups_finding(b.Facts(evidence=ev))


def test_stale_group_is_a_warning_in_the_report():
    finding = groups_finding(group_listed=True)
    assert finding.status == "warn" and "newgrp kvm" in finding.fix
    assert groups_finding(groups=(1000, 4242)).status == "pass"
    assert groups_finding().status == "info" and "not in group kvm" in groups_finding().summary


@on_pvm_host
def test_python_dash_m_tells_the_truth_here():
    done = subprocess.run(
        [sys.executable, "-m", "boxlite_syscheck", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    check_shape(report)
    assert report["error"]["cause"] == "guest-emulated-pvm"


# ── The rough edges a new user hit (issue 13) ───────────────────────────────


def test_quiet_keeps_a_warning_with_its_fix_and_strict_says_why(mocker, capsys):
    reporting(
        mocker,
        b.Finding("x.ok", "pass", "fine"),
        b.Finding("x.warn", "warn", "a warning", fix="do it"),
    )
    assert b.main(["-q"]) == 0
    out = capsys.readouterr().out
    assert "WARN  x.warn  a warning" in out and "x.warn: do it" in out and "PASS" not in out
    assert b.main(["-q", "--strict"]) == 1
    assert "--strict: warnings count as not usable" in capsys.readouterr().err


@pytest.mark.parametrize(
    "env, expected",
    [({"NO_COLOR": ""}, True), ({"NO_COLOR": "1"}, False), ({"TERM": "dumb"}, False), ({}, True)],
)
def test_colour_rules(mocker, monkeypatch, env, expected):
    mocker.patch.object(sys.stdout, "isatty", return_value=True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert b._colour_wanted() is expected


def test_the_usage_line_names_the_command_as_run(mocker, capsys):
    mocker.patch.object(sys, "argv", ["/usr/local/bin/boxlite-syscheck"])
    assert b.main(["--bogus"]) == 2
    assert capsys.readouterr().err.startswith("usage: boxlite-syscheck")


def test_json_with_quiet_is_a_usage_error(capsys):
    assert b.main(["--json", "--quiet"]) == 2
    assert "--quiet applies to the text report only" in capsys.readouterr().err


def test_probe_hvf_on_linux_says_it_is_ignored(mocker, capsys):
    reporting(mocker, b.Finding("x.ok", "pass", "fine"))
    assert b.main(["--probe-hvf"]) == 0
    assert "--probe-hvf applies to macOS only" in capsys.readouterr().err


def test_a_fix_is_said_once(mocker, capsys):
    error = b.UnsupportedError(
        "no group\n\nFix: add the group", cause="kvm-not-in-group", fix="add the group"
    )
    failing = b._failing("kvm.smoke", error)
    reporting(
        mocker,
        failing,
        b.Finding("kvm.groups", "warn", "no group", fix="add the group"),
        error=error,
    )
    b.main([])
    assert capsys.readouterr().out.count("add the group") == 1


def test_objects_print_as_what_they_are():
    assert repr(b.KvmProbe("x86_64")) == "KvmProbe('x86_64', path='/dev/kvm')"
    assert repr(b.HvfProbe("arm64")) == "HvfProbe('arm64')"
    report = b.Report([b.Finding("x", "pass", "ok")], None, {})
    assert repr(report) == "<Report usable, 1 findings>"
    assert "object at 0x" not in repr(b.SystemCheck(None, None, b.HvfProbe("arm64")))


def test_json_error_has_evidence_and_says_the_fix_once():
    facts = b.Facts(evidence=b.Evidence(gather=False))
    facts.smoke = b.SmokeResult("native")
    facts.smoke.step, facts.smoke.error = b.STEP_CREATE_VM, errno.EBUSY
    error = b._diagnose(facts)
    data = b.Report([b._failing("kvm.smoke", error)], error, {}).as_dict()["error"]
    assert data["code"] == "unsupported" and data["cause"] == "kvm-busy"
    assert data["summary"].startswith("KVM cannot create a VM")
    assert data["evidence"]["answer"] == "EBUSY (Device or resource busy)"
    assert "quit the other hypervisor" not in data["message"] and "quit the other" in data["fix"]


def test_sdk_codes_match_boxlite_010():
    # boxlite 0.10 (PyPI), boxlite/errors.py
    expected = {
        "UnsupportedError": "unsupported",
        "EngineError": "engine_unavailable",
        "ResourceExhaustedError": "resource_exhausted",
        "InternalError": "internal",
        "InvalidArgumentError": "invalid_argument",
        "ImageError": "image_pull_failed",
        "NetworkError": "network_unavailable",
        "ConfigError": "config_error",
    }
    for name, code in expected.items():
        assert getattr(b, name).code == code
    assert b.PortalError.code is None and isinstance(b.UnsupportedError("x"), RuntimeError)


def test_a_user_without_a_name_is_said_by_uid():
    assert b._who(b.Evidence(gather=False, euid=65533)) == "uid 65533"
    assert b._who(b.Evidence(gather=False, euid=1000, user="alice")) == "alice (uid 1000)"


def test_an_open_mode_needs_no_group():
    finding = groups_finding(node={**KVM_NODE, "mode": 0o666})
    assert finding.status == "info" and "every user" in finding.summary


@needs_kvm
def test_every_python_block_in_the_readme_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    # The integration recipe needs BoxLite's SDK: tests/test_sdk.py runs it.
    blocks = re.findall(r"(?<!<!-- recipe -->\n)```python\n(.*?)```", text, re.S)
    assert blocks
    for number, block in enumerate(blocks):
        script = tmp_path / f"block{number}.py"
        script.write_text(block)
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert done.returncode == 0, f"README python block {number}:\n{block}\n{done.stderr}"


# ── No kernel waits on the command's exit (issue 20) ────────────────────────

HAND_OFF = r"""
import ctypes, json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER: orphans come to us
if sys.argv[2] == "threads":
    stop = threading.Event()
    threading.Thread(target=stop.wait).start()
def links(pid):
    # The holder is an interpreter starting up: its own files come and go
    # until it waits on its pipe, so read until two listings agree.
    where, seen = f"/proc/{pid}/fd", None
    for _ in range(200):
        try:
            now = sorted(os.readlink(f"{where}/{n}") for n in os.listdir(where) if n.isdigit())
        except FileNotFoundError:
            continue
        if now == seen:
            return now
        seen = now
        time.sleep(0.01)
    return seen
def children():
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.append(int(name))
        except OSError:
            pass
    return found
b._hold_for_exit()
device = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
b._probe_startup_ioctls(device, b._STARTUP_STEPS)
held = b._CACHE["held-for-exit"]
fds = [fd for _, owned in held for fd in owned if fd >= 0]
out = {"vms": [os.readlink(f"/proc/self/fd/{fd}") for fd in fds]}
b._CACHE.pop("held-for-exit")
done = b._spawn_holder(fds)
out["holders"] = [links(pid).count("anon_inode:kvm-vm") for pid in children()]
for release, _ in held:
    release()
out["ours_open"] = [fd for fd in fds if os.path.lexists(f"/proc/self/fd/{fd}")]
if done is not None:
    os.close(done)
    pid, status = os.waitpid(-1, 0)
    out["holder_exit"] = status
if sys.argv[2] == "threads":
    stop.set()
print(json.dumps(out))
"""


@needs_kvm
def test_the_probe_vms_go_to_a_detached_holder_that_releases_them_last(run_json):
    out = run_json(HAND_OFF, "alone")
    assert out["vms"] and set(out["vms"]) == {"anon_inode:kvm-vm"}
    # One holder, holding every VM, while this process drops its own references.
    assert out["holders"] == [len(out["vms"])]
    assert out["ours_open"] == [] and out["holder_exit"] == 0


@needs_kvm
def test_with_threads_running_the_holder_is_spawned_all_the_same(run_json):
    # posix_spawn copies nothing of this process: threads do not stop it.
    out = run_json(HAND_OFF, "threads")
    assert out["holders"] == [len(out["vms"])]
    assert out["ours_open"] == [] and out["holder_exit"] == 0


HOLDER_FDS = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import boxlite_syscheck as b
leak = os.pipe()  # inherited without close-on-exec, as a parent's pipe can be
for fd in leak:
    os.set_inheritable(fd, True)
vm = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)  # stands for a VM's descriptor
done = b._spawn_holder([vm])
def parent(name):
    try:
        with open(f"/proc/{name}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None  # gone since the listing
pid = next(int(n) for n in os.listdir("/proc") if n.isdigit() and parent(n) == os.getpid())
fds, seen = None, {}
while fds != seen:  # the holder's start-up opens its own files: wait till it settles
    time.sleep(0.02)
    try:
        fds, seen = seen, {n: os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
    except FileNotFoundError:
        fds = None
os.close(done)
_, status = os.waitpid(pid, 0)
print(json.dumps({"fds": fds, "leak": [os.readlink(f"/proc/self/fd/{fd}") for fd in leak],
                  "status": status, "sid": os.getsid(0)}))
"""


def test_the_holder_keeps_the_vms_and_nothing_else_of_ours(run_json):
    out = run_json(HOLDER_FDS)
    fds = out["fds"]
    assert fds["0"].startswith("pipe:") and fds["1"] == fds["2"] == "/dev/null"
    assert sorted(fds.values()).count("/dev/null") == 3, fds  # stdout, stderr, the "VM"
    assert not set(out["leak"]) & set(fds.values()), "an inherited pipe went along"
    assert out["status"] == 0  # it read end-of-file when the pipe's end closed


WRAPPER = r"""
import ctypes, json, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
done = subprocess.run([sys.executable, "-m", "boxlite_syscheck", *sys.argv[2:]],
                      cwd=sys.argv[1], capture_output=True, text=True)
orphans = []
while True:
    try:
        orphans.append(os.waitpid(-1, 0)[1])
    except ChildProcessError:
        break
print(json.dumps({"exit": done.returncode, "out": done.stdout, "orphans": orphans}))
"""


@on_pvm_host
def test_the_command_exits_without_waiting_for_the_teardown(run_json):
    # The default check probes the start-up ioctls (irqchip VMs): a holder
    # outlives the command and is reparented, so nothing waited for it.
    out = run_json(WRAPPER, "--format", "prometheus")
    assert out["exit"] == 0 and "boxlite_syscheck_check_success 1" in out["out"]
    assert out["orphans"] == [0]
    bare = run_json(WRAPPER, "--engine", "none", "-q")  # no irqchip VMs, no holder
    assert bare["exit"] == 0 and bare["orphans"] == []


@needs_kvm
@needs("strace")
@pytest.mark.parametrize("entry", ["cli", "gate"])
def test_the_start_up_vms_are_made_just_before_the_guests_vm(entry, tmp_path):
    """On Linux 6.1 a VM made more than an RCU grace period after the last
    one waits for a grace period (its NX huge page thread joins its
    cgroups): the start-up VMs and the guest's are made back to back, the
    guest's runs after both, not between them."""
    trace = tmp_path / "trace"
    code = {
        "cli": "import boxlite_syscheck as b; b.main(['--format', 'json'])",
        "gate": "import boxlite_syscheck as b\ntry: b.SystemCheck.run().close()\nexcept b.BoxliteError: pass",
    }[entry]
    subprocess.run(
        ["strace", "-f", "-o", str(trace), "-e", "trace=ioctl", sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    calls = [line for line in trace.read_text().splitlines() if "ioctl(" in line]
    runs = [i for i, line in enumerate(calls) if "KVM_RUN" in line]
    irqchips = [i for i, line in enumerate(calls) if "KVM_CREATE_IRQCHIP" in line]
    vms = [i for i, line in enumerate(calls) if "KVM_CREATE_VM" in line]
    assert runs and irqchips, calls[-5:]
    assert all(i < min(runs) for i in vms), calls  # no VM is made once the guest runs
    assert max(irqchips) < vms[-1], calls  # and the last one made, the guest's, follows them
