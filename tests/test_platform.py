"""Platform dispatch and the import-time contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, needs_kvm

import boxlite_syscheck as b


@pytest.mark.parametrize(
    ("system", "machine", "cls"),
    [
        ("linux", "x86_64", b.KvmProbe),
        ("linux", "aarch64", b.KvmProbe),
        ("darwin", "arm64", b.HvfProbe),
        ("darwin", "x86_64", b.HvfProbe),
        ("win32", "AMD64", b.UnsupportedPlatformProbe),
        ("freebsd14", "amd64", b.UnsupportedPlatformProbe),
    ],
)
def test_select_probe(system, machine, cls):
    probe = b._select_probe(system, machine)
    assert type(probe) is cls


def test_probe_for_this_host_is_chosen_at_import():
    assert b.hypervisor_probe() is b._PROBE
    if sys.platform.startswith("linux"):
        assert isinstance(b.hypervisor_probe(), b.KvmProbe)


def test_unsupported_platform(mocker):
    probe = b._select_probe("win32", "AMD64")
    with pytest.raises(b.UnsupportedError) as caught:
        probe.startup_check()
    assert "only supports Linux and macOS" in str(caught.value)
    mocker.patch.object(b, "_PROBE", probe)
    with pytest.raises(b.UnsupportedError):
        b.SystemCheck.run()
    report = b.check()
    assert report.verdict == "not-usable"
    assert report.findings[0].status == "fail"
    # An engine's failure there is the platform's: said so, the engine's error chained.
    original = b.EngineError("x")
    precise = probe.diagnose_create_failure(original)
    assert precise.cause == "platform-unsupported" and precise.__cause__ is original
    storage = b.StorageError("no space")
    assert probe.diagnose_create_failure(storage) is storage  # not the host's


def test_import_touches_nothing():
    code = (
        "import sys, os\n"
        "before = set(os.listdir('/proc/self/fd'))\n"
        "import boxlite_syscheck\n"
        "after = set(os.listdir('/proc/self/fd'))\n"
        "import json\n"
        "print(json.dumps({'heavy': sorted(m for m in ('ctypes', 'logging', 'subprocess',"
        " 'fcntl', 'mmap', 'signal', 'argparse', 'json', 'typing') if m in before_mods),"
        " 'fds': len(after - before)}))\n"
    ).replace("before_mods", "mods")
    code = code.replace(
        "import boxlite_syscheck\n", "import boxlite_syscheck\nmods = set(sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    seen = json.loads(done.stdout)
    assert seen == {"heavy": [], "fds": 0}


@needs_kvm
@pytest.mark.parametrize("backend", ["native", "python"])
def test_the_first_checks_import_only_what_they_use(backend):
    # On a lean start (no site: as a plain Debian python3, which loads none
    # of these), the first bare check and the first gate must not pay for
    # functools, collections, threading, queue, enum or logging imports.
    code = (
        "import sys, json\n"
        "import boxlite_syscheck as b\n"
        "before = set(sys.modules)\n"
        f"b.SystemCheck.run(engine=None, backend={backend!r}).close()\n"
        "bare = set(sys.modules) - before\n"
        "try:\n"
        f"    b.SystemCheck.run(backend={backend!r}).close()\n"
        "except b.BoxliteError:\n"
        "    pass\n"
        "b._wait_for_closes()\n"
        "gate = set(sys.modules) - before - bare\n"
        "print(json.dumps([sorted(bare), sorted(gate)]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    bare, gate = json.loads(done.stdout)
    assert "ctypes" in bare  # the check did run
    heavy = {"functools", "collections", "threading", "queue", "enum", "signal", "logging", "math"}
    assert heavy.isdisjoint(bare + gate), (bare, gate)
