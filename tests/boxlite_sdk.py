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
