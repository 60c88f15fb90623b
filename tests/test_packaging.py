"""The package as users install it: sdist -> wheel -> a fresh virtualenv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import KVM_REASON, ROOT


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The sdist, and the wheel built from that sdist, as `python -m build` makes them."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "deprecat" not in (done.stdout + done.stderr).lower(), done.stdout + done.stderr
    sdists, wheels = list(out.glob("*.tar.gz")), list(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1
    return sdists[0], wheels[0]


def test_the_sdist_carries_what_builds_and_tests_it(built):
    sdist, _ = built
    names = {
        Path(n).relative_to(Path(n).parts[0]).as_posix()
        for n in tarfile.open(sdist).getnames()
        if len(Path(n).parts) > 1
    }
    assert {
        "LICENSE",
        "Makefile",
        "kvm_smoke.c",
        "boxlite_syscheck.py",
        "setup.py",
        "tests/conftest.py",
        "tests/test_kvm_real.py",
        "tests/bench_floor.c",
        "boxlite_syscheck.schema.json",
    } <= names


def test_the_wheel_is_a_typed_package_with_the_native_library(built):
    _, wheel = built
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "boxlite_syscheck/__init__.py",
        "boxlite_syscheck/__main__.py",
        "boxlite_syscheck/py.typed",
        "boxlite_syscheck/libkvmsmoke.so",
        "boxlite_syscheck/boxlite_syscheck.schema.json",
    } <= names
    assert (ROOT / "boxlite_syscheck.schema.json").read_bytes() == zipfile.ZipFile(wheel).read(
        "boxlite_syscheck/boxlite_syscheck.schema.json"
    )
    assert any(n.endswith("licenses/LICENSE") for n in names)
    metadata = (
        zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    )
    assert "License-Expression: Apache-2.0" in metadata
    assert (ROOT / "boxlite_syscheck.py").read_bytes() == zipfile.ZipFile(wheel).read(
        "boxlite_syscheck/__init__.py"
    )  # the one file stays the source


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory):
    _, wheel = built
    env = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    subprocess.run([env / "bin/pip", "install", "--quiet", str(wheel), "mypy"], check=True)
    return env


@pytest.mark.skipif(KVM_REASON is not None, reason=f"needs KVM: {KVM_REASON}")
def test_an_installed_copy_runs_the_native_backend(venv):
    for command in (
        [venv / "bin/python", "-m", "boxlite_syscheck"],
        [venv / "bin/boxlite-syscheck"],
    ):
        done = subprocess.run(
            [*map(str, command), "--engine", "none", "--json"],
            cwd="/",
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        host = json.loads(done.stdout)["host"]
        assert host["smoke_backend"] == "native", host
        assert "site-packages/boxlite_syscheck/libkvmsmoke.so" in host["native_library"]


def test_the_script_names_itself_in_its_usage(venv):
    done = subprocess.run(
        [str(venv / "bin/boxlite-syscheck"), "--bogus"], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.startswith("usage: boxlite-syscheck")


def test_users_code_type_checks_against_it(venv, tmp_path):
    user = tmp_path / "user.py"
    user.write_text(
        "import boxlite_syscheck as bs\n\n"
        "def gate() -> bool:\n"
        "    report: bs.Report = bs.check()\n"
        "    return report.verdict == 'usable'\n"
    )
    done = subprocess.run(
        [str(venv / "bin/mypy"), "--strict", str(user)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "MYPYPATH": ""},
    )
    assert done.returncode == 0, done.stdout


def test_the_sdist_builds_the_library_and_runs_tests(built, tmp_path):
    sdist, _ = built
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path)
    tree = next(tmp_path.iterdir())
    subprocess.run(["make", "-C", str(tree), "libkvmsmoke.so"], check=True, capture_output=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_abi.py",
            "tests/test_errors.py",
        ],
        cwd=tree,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    assert " passed" in done.stdout


def test_without_a_compiler_the_wheel_is_pure_and_says_so(tmp_path):
    import os as _os

    env = {**_os.environ, "CC": "no-such-compiler-here"}
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "building a pure-Python wheel" in done.stdout + done.stderr
    wheel = next(tmp_path.glob("*.whl"))
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    assert not any(n.endswith(".so") for n in zipfile.ZipFile(wheel).namelist())
