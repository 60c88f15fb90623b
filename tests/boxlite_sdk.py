"""The real BoxLite SDK for the tests and the emulated hosts: a virtualenv of
the system Python with ``boxlite`` from PyPI, and the kernel it extracts.

Standard library only (tests/vmhost.py imports it too).
"""

from __future__ import annotations

import glob
import os
import subprocess
import tempfile
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"
KERNEL_VERSION = "0.10.8"  # the SDK whose kernel the deep-boot tests boot


class Unavailable(Exception):
    """PyPI cannot be reached, or the SDK cannot be installed or run here."""


def venv(version: str) -> Path:
    """/tmp/boxlite-sdk-VERSION: the SDK installed once per machine and
    version, readable by every user."""
    where = Path(f"/tmp/boxlite-sdk-{version}")
    python = where / "bin" / "python"
    check = [
        str(python),
        "-c",
        f"import boxlite, sys; sys.exit(boxlite.__version__ != {version!r})",
    ]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return where
    subprocess.run(["rm", "-rf", str(where)], check=True)
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(where)], check=True)
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"boxlite=={version}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise Unavailable(f"boxlite {version} cannot be installed from PyPI: {done.stderr[-500:]}")
    subprocess.run(["chmod", "-R", "a+rX", str(where)], check=True)
    return where


def extracted_libkrunfw(version: str = KERNEL_VERSION) -> Path:
    """The libkrunfw that BoxLite VERSION extracted (it does on its first
    runtime construction), under $XDG_DATA_HOME or ~/.local/share."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    pattern = os.path.join(base, "boxlite", "runtimes", f"v{version}-*", "libkrunfw.so*")
    found = sorted(glob.glob(pattern))
    if found:
        return Path(found[-1])
    python = venv(version) / "bin" / "python"
    with tempfile.TemporaryDirectory() as home:
        code = "import boxlite, sys; boxlite.Boxlite(boxlite.Options(home_dir=sys.argv[1]))"
        done = subprocess.run(
            [str(python), "-c", code, home], capture_output=True, text=True, timeout=300
        )
    found = sorted(glob.glob(pattern))
    if not found:
        raise Unavailable(
            f"boxlite {version} extracted no libkrunfw under {base}: {done.stderr[-500:]}"
        )
    return Path(found[-1])


def busybox_oci_layout(where: Path) -> Path:
    """A one-layer OCI image layout holding a static busybox: enough for a
    BoxLite box to start with no network."""
    import gzip
    import hashlib
    import io
    import json
    import tarfile

    busybox = Path("/bin/busybox")
    data = busybox.read_bytes() if busybox.exists() else b""
    # A static ELF has no PT_INTERP (3) among its program headers.
    phoff, phentsize, phnum = (
        (
            int.from_bytes(data[32:40], "little"),
            int.from_bytes(data[54:56], "little"),
            int.from_bytes(data[56:58], "little"),
        )
        if data
        else (0, 0, 0)
    )
    kinds = [int.from_bytes(data[phoff + i * phentsize :][:4], "little") for i in range(phnum)]
    if not data.startswith(b"\x7fELF") or 3 in kinds:
        raise Unavailable("needs a static /bin/busybox (Debian package busybox-static)")

    def blob(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (where / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (where / "blobs" / "sha256" / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for name in ("bin", "etc", "tmp", "proc", "sys", "dev", "root"):
            entry = tarfile.TarInfo(name)
            entry.type, entry.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(entry)
        data = busybox.read_bytes()
        entry = tarfile.TarInfo("bin/busybox")
        entry.size, entry.mode = len(data), 0o755
        tar.addfile(entry, io.BytesIO(data))
        for applet in ("sh", "echo", "cat", "sleep"):
            entry = tarfile.TarInfo(f"bin/{applet}")
            entry.type, entry.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(entry)
    raw = layer.getvalue()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
    }
    oci = "application/vnd.oci.image"
    manifest = {
        "schemaVersion": 2,
        "mediaType": f"{oci}.manifest.v1+json",
        "config": {"mediaType": f"{oci}.config.v1+json", **blob(json.dumps(config).encode())},
        "layers": [{"mediaType": f"{oci}.layer.v1.tar+gzip", **blob(gzip.compress(raw))}],
    }
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": f"{oci}.manifest.v1+json",
                **blob(json.dumps(manifest).encode()),
                "platform": {"architecture": "amd64", "os": "linux"},
            }
        ],
    }
    (where / "index.json").write_text(json.dumps(index))
    (where / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return where
