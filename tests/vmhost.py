"""Boot a throwaway KVM host under QEMU's emulator and run the check inside it.

    python3 tests/vmhost.py x86-nested [--build-dir build/nested]
    python3 tests/vmhost.py aarch64 [--build-dir build/aarch64]

``aarch64`` boots Debian's arm64 kernel under qemu-system-aarch64 with
``virtualization=on`` (emulated EL2, so the built-in KVM comes up), with
Debian's arm64 Python and a cross-built libkvmsmoke.so: the arm64 smoke test
must pass with both backends; a boot without EL2 must be diagnosed as such.
It checks the use of KVM's API on arm64, not real-hardware behaviour.

``x86-nested`` is the positive control: QEMU's TCG emulator gives a Debian
amd64 kernel an emulated AMD CPU with SVM, kvm_amd loads, and /dev/kvm runs
guest code in (emulated) hardware, the way VT-x/AMD-V does on a good host.
The default gate must pass there with both backends.  A second boot with a
CPU without SVM is the negative control: no /dev/kvm, and the check must say
why.  The guest side is tests/guest_cases.py; it prints one line per case,
``CASE <name> PASS|FAIL <detail>``, which this script collects.

It installs what it needs with apt-get (as root), downloads Debian's kernel
package once into the build directory, and packs the host's own Python 3
(Debian's /usr/bin/python3.11, the same interpreter CI has), the module, the
native library and the cases into an initramfs.  Exit status: 0 when every
expected case passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import boxlite_sdk  # noqa: E402

PYTHON = "/usr/bin/python3.11"
TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "cpio": "cpio", "busybox": "busybox-static"}
# Modules, in load order (kvm_amd needs ccp for SEV; irqbypass for posted IRQs).
MODULES = [
    "virt/lib/irqbypass.ko",
    "drivers/crypto/ccp/ccp.ko",
    "arch/x86/kvm/kvm.ko",
    "arch/x86/kvm/kvm-amd.ko",
]
# What each boot must report, in order.
BOOTS = {
    "svm": {
        "cpu": "EPYC",
        "cases": [
            "kvm-device",
            "gate-native",
            "gate-python",
            "backends-agree",
            "report",
            "engines",
            "bare-device",
            "cli-json",
            "deep-native",
            "deep-python",
            "deep-report",
            "deep-cli",
            "bench",
            "speed-under-load",
        ],
    },
    "no-svm": {"cpu": "qemu64,-svm", "cases": ["no-kvm-diagnosed"]},
}
STDLIB_SKIP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "unittest",
    "sqlite3",
    "venv",
    "__pycache__",
    "config-3.11-x86_64-linux-gnu",
    "email",
    "xmlrpc",
    "asyncio",
    "multiprocessing",
    "curses",
    "dbm",
    "wsgiref",
    "html",
    "http",
    "urllib",
    "xml",
    "site-packages",
    "dist-packages",
}


def say(text: str) -> None:
    print(f"vmhost: {text}", flush=True)


def ensure_tools() -> None:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        if os.geteuid() != 0:
            sys.exit(f"vmhost: needs {', '.join(missing)} (apt-get install, as root)")
        say(f"installing {' '.join(missing)}")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)
    if not os.access(PYTHON, os.X_OK):
        sys.exit(f"vmhost: needs {PYTHON} (Debian's python3.11-minimal)")


def kernel_tree(build: Path) -> tuple[Path, Path]:
    """Download (once) and unpack Debian's amd64 kernel; return (vmlinuz, modules)."""
    debs = sorted(build.glob("linux-image-*-amd64_*.deb"))
    if not debs:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        depends = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        name = re.search(r"Depends: (linux-image-\S+-amd64)", depends)
        if not name:
            sys.exit("vmhost: cannot find the current Debian kernel package")
        say(f"downloading {name.group(1)} (about 70 MB, once)")
        subprocess.run(["apt-get", "download", name.group(1)], cwd=build, check=True)
        debs = sorted(build.glob("linux-image-*-amd64_*.deb"))
    tree = build / "kernel"
    if not any(tree.glob("boot/vmlinuz-*")):
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tree)], check=True)
    vmlinuz = sorted(tree.glob("boot/vmlinuz-*"))[-1]
    modules = sorted(tree.glob("lib/modules/*/kernel"))[-1]
    return vmlinuz, modules


def shared_libraries(paths: list[str]) -> set[str]:
    found: set[str] = set()
    for path in paths:
        out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
        found.update(re.findall(r"(/\S+\.so[.\d]*)", out))
    return found


def copy(src: str, root: Path) -> None:
    dest = root / src.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(src), dest)


# How tests/gate_floor.c is built as the library guest_cases.floor_ratio
# calls (here and by make bench): its main() renamed out of the way.
GATE_FLOOR_LIBRARY = ("-shared", "-fPIC", "-Dmain=gate_floor_main")


def stage(build: Path, modules: Path) -> Path:
    """Lay out the initramfs: busybox, Python, the module, the cases, /init."""
    root = build / "root"
    if root.exists():
        shutil.rmtree(root)
    (root / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "bin/busybox")
    (root / "modules").mkdir()
    for module in MODULES:
        shutil.copy2(modules / module, root / "modules" / Path(module).name)
    stdlib = Path("/usr/lib/python3.11")
    for item in stdlib.iterdir():
        if item.name in STDLIB_SKIP:
            continue
        dest = root / "usr/lib/python3.11" / item.name
        if item.is_dir():
            shutil.copytree(item, dest, ignore=shutil.ignore_patterns("__pycache__", "test*"))
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, dest)
    dynload = glob.glob("/usr/lib/python3.11/lib-dynload/*.so")
    for lib in shared_libraries([PYTHON, *dynload]):
        copy(lib, root)
    copy(PYTHON, root)
    # BoxLite's own kernel, where BoxLite extracts it (the guest's XDG_DATA_HOME
    # is /xdg): the deep boot's positive control.
    kernel = boxlite_sdk.extracted_libkrunfw()
    runtime = root / "xdg/boxlite/runtimes" / kernel.parent.name
    runtime.mkdir(parents=True)
    shutil.copy2(kernel, runtime / kernel.name)
    install_app(root, ROOT / "libkvmsmoke.so", INIT)
    # The C floor of the default gate, a library the cases call in-process
    # (the C library it needs is Python's own, in the guest already).
    floor = [str(ROOT / "tests/gate_floor.c"), "-o", str(root / "syscheck/libgate_floor.so")]
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", *GATE_FLOOR_LIBRARY, *floor], check=True)
    return root


# The real engine's host: the same initramfs with BoxLite's SDK added, and
# / made a real mount first (BoxLite's sandbox cannot pivot_root out of an
# initramfs): /init binds / onto itself, moves it to / and starts again.
def stage_box(build: Path) -> Path:
    """What the box host adds to the initramfs (a second cpio archive, laid
    over the first): the boxlite wheel's files, the libraries its binaries
    need, the stdlib packages the SDK imports, a busybox OCI layout, /init."""
    root = build / "root-box"
    if root.exists():
        shutil.rmtree(root)
    site = boxlite_sdk.venv(boxlite_sdk.KERNEL_VERSION) / "lib/python3.11/site-packages"
    dest = root / "boxlite-site"
    for item in site.glob("boxlite*"):
        shutil.copytree(item, dest / item.name, ignore=shutil.ignore_patterns("__pycache__"))
    elves = [
        str(path)
        for path in dest.rglob("*")
        if path.is_file() and path.read_bytes()[:4] == b"\x7fELF"
    ]
    # The runtime BoxLite extracts at its first start (shim, bwrap, mke2fs):
    # what those link against, and libcap, which its bundled bwrap loads.
    runtime = boxlite_sdk.extracted_libkrunfw().parent
    elves += [str(path) for path in runtime.iterdir() if path.is_file()]
    # Already extracted, as on a host where BoxLite ran once: extracting
    # 76 MB under the emulator would take minutes.
    shutil.copytree(runtime, root / "xdg/boxlite/runtimes" / runtime.name)
    for lib in shared_libraries(elves) | {"/lib/x86_64-linux-gnu/libcap.so.2"}:
        copy(lib, root)
    for name in ("asyncio", "email", "urllib", "http", "html", "xml"):
        shutil.copytree(
            Path("/usr/lib/python3.11") / name,
            root / "usr/lib/python3.11" / name,
            ignore=shutil.ignore_patterns("__pycache__", "test*"),
        )
    boxlite_sdk.busybox_oci_layout(root / "oci")
    init = root / "init"
    init.write_text(BOX_INIT)
    init.chmod(0o755)
    return root


def install_app(root: Path, library: Path, init_script: str) -> None:
    """The module, its library and the cases under /syscheck; bytecode; /init."""
    app = root / "syscheck"
    app.mkdir()
    shutil.copy2(ROOT / "boxlite_syscheck.py", app / "boxlite_syscheck.py")
    shutil.copy2(library, app / "libkvmsmoke.so")
    shutil.copy2(ROOT / "tests/guest_cases.py", app / "guest_cases.py")
    shutil.copy2(ROOT / "tests/clocks.py", app / "clocks.py")
    # Bytecode made here with the same Python version: it does not depend on
    # the CPU, and the guest then runs it cached, as users do, instead of
    # compiling under the emulator.
    subprocess.run(
        [
            PYTHON,
            "-m",
            "compileall",
            "-q",
            "-j0",
            "--invalidation-mode",
            "unchecked-hash",
            str(root / "usr/lib/python3.11"),
            str(app),
        ],
        check=True,
    )
    init = root / "init"
    init.write_text(init_script)
    init.chmod(0o755)


# The start of every guest's /init: busybox, and the kernel's filesystems.
INIT_HEAD = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin PYTHONDONTWRITEBYTECODE=1
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
"""
INIT = (
    INIT_HEAD
    + """for m in /modules/irqbypass.ko /modules/ccp.ko /modules/kvm.ko /modules/kvm-amd.ko; do
    insmod $m 2>/dev/null || echo "vmhost-guest: insmod $m failed"
done
echo "vmhost-guest: booted, cpu flags: $(grep -o -w -E 'svm|npt|hypervisor' /proc/cpuinfo | sort -u | tr '\\n' ' ')"
/usr/bin/python3.11 /syscheck/guest_cases.py
echo "vmhost-guest: done"
poweroff -f
"""
)


BOX_INIT = (
    INIT_HEAD
    + """if [ -z "$VMHOST_REMOUNTED" ]; then
    mkdir -p /newroot
    mount -o rbind / /newroot
    cd /newroot
    mount -o move . /
    export VMHOST_REMOUNTED=1
    exec chroot . /init
fi
for m in /modules/irqbypass.ko /modules/ccp.ko /modules/kvm.ko /modules/kvm-amd.ko; do
    insmod $m 2>/dev/null || echo "vmhost-guest: insmod $m failed"
done
mkdir -p /tmp/box-home
echo "vmhost-guest: box host booted, / is $(grep ' / ' /proc/mounts | head -1)"
PYTHONPATH=/boxlite-site /usr/bin/python3.11 /syscheck/guest_cases.py box
echo "vmhost-guest: done"
poweroff -f
"""
)


def pack(root: Path, out: Path) -> None:
    files = subprocess.run(
        ["find", "."], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    cpio = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        cwd=root,
        input=files.encode(),
        capture_output=True,
        check=True,
    ).stdout
    import gzip

    out.write_bytes(gzip.compress(cpio, compresslevel=1))


def boot(
    vmlinuz: Path,
    initrd: Path,
    cpu: str,
    log: Path,
    limit: float,
    memory: int = 1024,
    cpus: int = 1,
) -> str:
    command = [
        "qemu-system-x86_64",
        "-accel",
        "tcg,thread=multi" if cpus > 1 else "tcg",
        "-cpu",
        cpu,
        "-m",
        str(memory),
        "-smp",
        str(cpus),
        "-kernel",
        str(vmlinuz),
        "-initrd",
        str(initrd),
        "-no-reboot",
        "-nographic",
        "-append",
        # loglevel=4: the kernel's errors too (an RCU stall report is one),
        # so that a host that stops says why on the console.
        "console=ttyS0 panic=-1 quiet loglevel=4",
    ]
    return run_qemu(command, cpu, log, limit)


ARM_PACKAGES = [
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libffi8",
    "libc6",
    "zlib1g",
    "libexpat1",
    "busybox-static",
]
ARM_TOOLS = {
    "qemu-system-aarch64": "qemu-system-arm",
    "cpio": "cpio",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
}
ARM_BOOTS = {
    "el2": {
        "machine": "virt,virtualization=on",
        "cases": [
            "kvm-device",
            "gate-native",
            "gate-python",
            "backends-agree",
            "report",
            "bare-device",
            "cli-json",
            "bound",
            "deep-unavailable",
        ],
    },
    "no-el2": {"machine": "virt", "cases": ["no-kvm-diagnosed"]},
}
ARM_INIT = (
    INIT_HEAD
    + """echo "vmhost-guest: booted, $(dmesg | grep -o -E 'kvm \\[1\\]: [^,]*(initialized|available)[^,]*' | head -1)"
/usr/bin/python3.11 /syscheck/guest_cases.py
echo "vmhost-guest: done"
poweroff -f
"""
)


def arm_pieces(build: Path) -> tuple[Path, Path]:
    """Install the tools, download (once) the arm64 kernel and Python; unpack."""
    missing = sorted({pkg for tool, pkg in ARM_TOOLS.items() if shutil.which(tool) is None})
    if missing or not Path("/usr/aarch64-linux-gnu/include/linux/kvm.h").exists():
        if os.geteuid() != 0:
            sys.exit("vmhost: needs qemu-system-arm, gcc-aarch64-linux-gnu, cpio (as root)")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *missing, "libc6-dev-arm64-cross"], check=True
        )
    debs = {p: sorted(build.glob(f"{p}_*_arm64.deb")) for p in ARM_PACKAGES}
    kernels = sorted(build.glob("linux-image-*-arm64_*_arm64.deb"))
    if not kernels or not all(debs.values()):
        arches = subprocess.run(
            ["dpkg", "--print-foreign-architectures"], capture_output=True, text=True
        ).stdout.split()
        if "arm64" not in arches:
            subprocess.run(["dpkg", "--add-architecture", "arm64"], check=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        depends = subprocess.run(
            ["apt-cache", "depends", "linux-image-arm64:arm64"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        name = re.search(r"(linux-image-\S+-arm64)", depends)
        if not name:
            sys.exit("vmhost: cannot find Debian's arm64 kernel package")
        say("downloading the arm64 kernel and Python (about 70 MB, once)")
        subprocess.run(
            [
                "apt-get",
                "download",
                f"{name.group(1)}:arm64",
                *(f"{p}:arm64" for p in ARM_PACKAGES),
            ],
            cwd=build,
            check=True,
        )
        kernels = sorted(build.glob("linux-image-*-arm64_*_arm64.deb"))
    tree = build / "kernel"
    if not any(tree.glob("boot/vmlinuz-*")):
        subprocess.run(["dpkg-deb", "-x", str(kernels[-1]), str(tree)], check=True)
    root = build / "root"
    if root.exists():
        shutil.rmtree(root)
    for deb in sorted(build.glob("*_arm64.deb")):
        if not deb.name.startswith("linux-image"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    for junk in (
        "usr/share",
        "usr/lib/python3.11/test",
        "usr/lib/python3.11/idlelib",
        "usr/lib/python3.11/tkinter",
        "usr/lib/python3.11/ensurepip",
        "usr/lib/python3.11/lib2to3",
        "usr/lib/python3.11/pydoc_data",
    ):
        shutil.rmtree(root / junk, ignore_errors=True)
    (root / "bin").mkdir(exist_ok=True)
    library = build / "libkvmsmoke.so"
    subprocess.run(
        [
            "aarch64-linux-gnu-gcc",
            "-O2",
            "-std=gnu11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fPIC",
            "-shared",
            "-Wl,-z,now",
            "-Wl,-z,relro",
            "-o",
            str(library),
            str(ROOT / "kvm_smoke.c"),
        ],
        check=True,
    )
    install_app(root, library, ARM_INIT)
    return sorted(tree.glob("boot/vmlinuz-*"))[-1], root


def boot_arm(vmlinuz: Path, initrd: Path, machine: str, log: Path, limit: float) -> str:
    command = [
        "qemu-system-aarch64",
        "-M",
        machine,
        "-cpu",
        "max,pauth-impdef=on",
        "-smp",
        "1",
        "-m",
        "1024",
        "-kernel",
        str(vmlinuz),
        "-initrd",
        str(initrd),
        "-no-reboot",
        "-nographic",
        "-append",
        "console=ttyAMA0 panic=-1 quiet loglevel=3",
    ]
    return run_qemu(command, machine, log, limit)


# A line the guest's own cases print: anything else on the console is the
# kernel's (a soft lockup repeats its warning, and is no progress).
PROGRESS = re.compile(r"CASE |vmhost-guest:|BOX-STEP |DEEP-BOOT |REPORT-SPEED ")
# Past this long without progress QEMU is stopped: the guest's own watchdog
# (guest_cases.CASE_LIMIT, 400 s) speaks first when a case of ours hangs.
SILENCE = 600.0


def run_qemu(command: list[str], what: str, log: Path, limit: float) -> str:
    """Run QEMU to its end, ``limit`` seconds in all or SILENCE seconds
    without progress, whichever comes first; return its console."""
    started = time.monotonic()
    output = stream(command, limit, SILENCE)
    log.write_text(output)
    say(f"{what}: QEMU ran {time.monotonic() - started:.1f} s (log {log})")
    return output


def stream(command: list[str], limit: float, silence: float) -> str:
    """The output of ``command`` (stdout and stderr), killed at ``limit``
    seconds or after ``silence`` seconds without a PROGRESS line; a note at
    the end says which."""
    import codecs
    import selectors

    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    started = last = time.monotonic()
    chunks: list[str] = []
    pending = ""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            stopped = ""
            while True:
                now = time.monotonic()
                if now - started >= limit:
                    stopped = f"QEMU did not finish within {limit:.0f} s"
                elif now - last >= silence:
                    stopped = f"QEMU's guest made no progress for {silence:.0f} s"
                if stopped:
                    proc.kill()
                    break
                if not sel.select(timeout=min(1.0, limit, silence)):
                    continue
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:
                    break
                text = decoder.decode(data)
                chunks.append(text)
                lines = (pending + text).split("\n")
                pending = lines.pop()
                if any(PROGRESS.search(line) for line in lines):
                    last = time.monotonic()
        proc.wait()
    output = "".join(chunks)
    if stopped:
        output += f"\nvmhost: {stopped}\n"
    return output


def collect(output: str, name: str, expected: list[str], quiet: bool = False) -> int:
    """Print each case's line (unless ``quiet``); return how many failed or
    were missing."""
    seen: dict[str, tuple[str, str]] = {}
    for line in output.splitlines():
        match = re.search(r"CASE (\S+) (PASS|FAIL|INFO)(.*)", line)  # escapes may precede
        if match:
            seen[match.group(1)] = (match.group(2), match.group(3).strip())
    failures = 0
    lines = []
    for case in expected:
        status, detail = seen.get(case, ("FAIL", "not reported"))
        lines.append(f"{status} {name}/{case}: {detail}")
        failures += status == "FAIL"
    for case, (status, detail) in seen.items():
        if case not in expected:
            lines.append(f"{status} {name}/{case}: {detail}")
            failures += status == "FAIL"
    if not quiet:
        print("\n".join(lines), flush=True)
    return failures


def host_stopped(output: str) -> bool:
    """Whether the emulated host itself stopped before its cases were done:
    /init never got past them (its kernel hung, panicked or reset, or QEMU
    was stopped). A case of ours that hangs or crashes does not count:
    the guest's watchdog ends it and /init goes on to say it is done."""
    return "vmhost-guest: done" not in output


def tail(output: str, lines: int = 30) -> str:
    """The console's last lines that are not the cases' own reports: the
    kernel's words, a traceback, the watchdog's stacks."""
    kept = [line for line in output.splitlines() if not re.search(r"CASE \S+ (PASS|INFO)", line)]
    return "\n".join(f"    | {line[:300]}" for line in kept[-lines:])


# Boots of one host when it keeps stopping by itself: under TCG on a loaded
# machine a host has gone silent in about one boot in four (three times in
# four fresh-clone CI runs), never twice in a row so far.
BOOTS_PER_HOST = 3


def attempt(run: Callable[[Path], str], name: str, expected: list[str], log: Path) -> int:
    """Boot one emulated host and collect its cases; return the failures.

    When the emulated host itself stops before its cases are done (under
    TCG its kernel has gone silent or reset on a loaded machine), that boot
    says nothing about the check: it is booted again, up to BOOTS_PER_HOST
    boots in all, and every case must pass in one boot. A case that fails
    or hangs in a host that ran to its end is a failure, and is not retried."""
    output = run(log)
    for boot in range(2, BOOTS_PER_HOST + 1):
        if not (host_stopped(output) and collect(output, name, expected, quiet=True)):
            break
        say(f"{name}: the emulated host stopped before its cases were done; its console ended:")
        print(tail(output), flush=True)
        collect(output, name, expected)
        kept = log.with_name(f"{log.name}.{boot - 1}")
        say(f"{name}: booting it again, boot {boot} of at most {BOOTS_PER_HOST} (log kept: {kept})")
        log.rename(kept)
        output = run(log)
    failures = collect(output, name, expected)
    if failures:
        say(f"{name}: {failures} failed; the console ended:")
        print(tail(output), flush=True)
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=["x86-nested", "aarch64"])
    parser.add_argument("--build-dir")
    # Each QEMU run's cap. The x86 nested run takes 3-5 minutes on this kind
    # of host, but once took over 10 on a slow day with nothing else running.
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--box-only", action="store_true", help="x86-nested: only the BoxLite box")
    args = parser.parse_args()
    build = Path(
        args.build_dir or ROOT / "build" / ("nested" if args.target == "x86-nested" else "aarch64")
    )
    build.mkdir(parents=True, exist_ok=True)
    if args.target == "aarch64":
        vmlinuz, root = arm_pieces(build)
        initrd = build / "initrd.gz"
        pack(root, initrd)
        say(f"initramfs {initrd.stat().st_size / 1e6:.1f} MB, kernel {vmlinuz.name}")
        failures = 0
        for name, spec in ARM_BOOTS.items():

            def run_arm(log: Path, machine: str = spec["machine"]) -> str:
                return boot_arm(vmlinuz, initrd, machine, log, args.timeout)

            failures += attempt(run_arm, name, spec["cases"], build / f"{name}.log")
        print(f"{'PASS' if not failures else 'FAIL'}: aarch64, {failures} failed", flush=True)
        return 1 if failures else 0
    ensure_tools()
    if not (ROOT / "libkvmsmoke.so").exists():
        subprocess.run(["make", "-C", str(ROOT), "libkvmsmoke.so"], check=True)
    vmlinuz, modules = kernel_tree(build)
    root = stage(build, modules)
    initrd = build / "initrd.gz"
    pack(root, initrd)
    say(f"initramfs {initrd.stat().st_size / 1e6:.1f} MB, kernel {vmlinuz.name}")
    failures = 0
    for name, spec in {} if args.box_only else BOOTS.items():

        def run_x86(log: Path, cpu: str = spec["cpu"]) -> str:
            return boot(vmlinuz, initrd, cpu, log, args.timeout)

        failures += attempt(run_x86, name, spec["cases"], build / f"{name}.log")
    # The real engine: a BoxLite box in the same kind of host (3 GiB, 2 vCPUs:
    # its rootfs tmpfs is half the memory, and the box has a vCPU of its own).
    extra = build / "initrd-box-extra.gz"
    pack(stage_box(build), extra)
    box_initrd = build / "initrd-box.gz"
    box_initrd.write_bytes(initrd.read_bytes() + extra.read_bytes())
    say(f"box initramfs {box_initrd.stat().st_size / 1e6:.1f} MB")

    def run_box(log: Path) -> str:
        return boot(vmlinuz, box_initrd, "EPYC", log, args.timeout, memory=3072, cpus=2)

    failures += attempt(run_box, "svm-box", ["box-gate", "box-echo"], build / "svm-box.log")
    print(f"{'PASS' if not failures else 'FAIL'}: x86-nested, {failures} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
