"""Build the wheel from the one-file module.

``boxlite_syscheck.py`` stays the single source: vendored as it is, or
installed as the package ``boxlite_syscheck/`` made from it here, with
``py.typed`` (so type checkers use its annotations), ``__main__.py`` (so
``python -m boxlite_syscheck`` works), ``boxlite_syscheck.schema.json`` (the
JSON report's schema) and ``libkvmsmoke.so`` built next to it
when a C compiler is present.  Without one the wheel is pure Python and the
build says so; the module then runs its Python backend.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))
CC = os.environ.get("CC", "cc")
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-fPIC", "-shared", "-Wl,-z,now", "-Wl,-z,relro"]


def native_buildable() -> bool:
    return sys.platform.startswith("linux") and shutil.which(CC) is not None


class BuildPackage(build_py):
    """Lay out boxlite_syscheck/ in the build tree from boxlite_syscheck.py."""

    def run(self) -> None:
        super().run()
        target = os.path.join(self.build_lib, "boxlite_syscheck")
        os.makedirs(target, exist_ok=True)
        shutil.copyfile(
            os.path.join(HERE, "boxlite_syscheck.py"), os.path.join(target, "__init__.py")
        )
        with open(os.path.join(target, "__main__.py"), "w") as main:
            main.write("from boxlite_syscheck import console\n\nconsole()\n")
        open(os.path.join(target, "py.typed"), "w").close()
        schema = "boxlite_syscheck.schema.json"
        shutil.copyfile(os.path.join(HERE, schema), os.path.join(target, schema))
        if not native_buildable():
            print(
                "boxlite_syscheck: no C compiler (or not Linux): building a pure-Python "
                "wheel; the installed check will use its Python backend",
                file=sys.stderr,
            )
            return
        library = os.path.join(target, "libkvmsmoke.so")
        command = [CC, *CFLAGS, "-o", library, os.path.join(HERE, "kvm_smoke.c")]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(
                f"boxlite_syscheck: building libkvmsmoke.so failed, so the installed check "
                f"will use its Python backend:\n{done.stderr}",
                file=sys.stderr,
            )


class PlatformWhenNative(Distribution):
    """A wheel with libkvmsmoke.so is platform-specific; without it, pure."""

    def has_ext_modules(self) -> bool:
        return native_buildable()

    def has_pure_modules(self) -> bool:
        return True  # the package is laid out by BuildPackage, not listed


setup(cmdclass={"build_py": BuildPackage}, distclass=PlatformWhenNative)
