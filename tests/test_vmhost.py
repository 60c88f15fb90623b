"""The emulated hosts' harness (tests/vmhost.py): how it tells a hang of the
check from the emulated host itself stopping, with real processes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import vmhost


def test_a_guest_that_only_the_kernel_speaks_for_is_stopped_after_the_silence() -> None:
    # A soft-locked kernel repeats its warning: that is no progress.
    script = (
        "import time\n"
        "print('CASE first PASS fine', flush=True)\n"
        "while True:\n"
        "    print('watchdog: BUG: soft lockup - CPU#0 stuck for 22s!', flush=True)\n"
        "    time.sleep(0.1)\n"
    )
    start = time.monotonic()
    output = vmhost.stream([sys.executable, "-c", script], limit=60, silence=2.0)
    assert time.monotonic() - start < 30
    assert "CASE first PASS fine" in output
    assert output.rstrip().endswith("made no progress for 2 s")


def test_a_guest_that_reports_keeps_running_past_the_silence_and_ends_by_itself() -> None:
    script = (
        "import time\n"
        "for i in range(6):\n"
        "    print(f'CASE c{i} PASS ok', flush=True)\n"
        "    time.sleep(0.4)\n"
        "print('vmhost-guest: done', flush=True)\n"
    )
    output = vmhost.stream([sys.executable, "-c", script], limit=60, silence=1.0)
    assert output.splitlines()[-1] == "vmhost-guest: done"
    assert vmhost.collect(output, "t", [f"c{i}" for i in range(6)], quiet=True) == 0


def test_the_overall_limit_stops_a_guest_that_keeps_reporting() -> None:
    script = (
        "import time\nwhile True:\n    print('CASE x INFO busy', flush=True)\n    time.sleep(0.1)\n"
    )
    output = vmhost.stream([sys.executable, "-c", script], limit=1.5, silence=60)
    assert output.rstrip().endswith("did not finish within 2 s")


DONE = "vmhost-guest: done\n"


class Boots:
    """Consoles handed out one per boot, as QEMU would print them."""

    def __init__(self, *consoles: str) -> None:
        self.consoles = list(consoles)
        self.calls = 0

    def __call__(self, log: Path) -> str:
        self.calls += 1
        output = self.consoles.pop(0)
        log.write_text(output)
        return output


def test_a_host_that_stopped_before_its_cases_were_done_is_booted_once_more(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stopped = "CASE a PASS ok\nwatchdog: BUG: soft lockup - CPU#0 stuck\n"
    boots = Boots(stopped, "CASE a PASS ok\nCASE b PASS ok\n" + DONE)
    log = tmp_path / "svm.log"
    assert vmhost.attempt(boots, "svm", ["a", "b"], log) == 0
    assert boots.calls == 2
    said = capsys.readouterr().out
    assert "soft lockup" in said  # the first boot's evidence is shown
    assert (tmp_path / "svm.log.1").read_text() == stopped


def test_the_boot_after_a_stop_must_pass_every_case(tmp_path: Path) -> None:
    stopped = "CASE a PASS ok\n"
    boots = Boots(stopped, "CASE a FAIL broke\n" + DONE)
    assert vmhost.attempt(boots, "svm", ["a", "b"], tmp_path / "svm.log") == 2
    assert boots.calls == 2


def test_a_host_that_keeps_stopping_is_booted_at_most_three_times(tmp_path: Path) -> None:
    stopped = "CASE a PASS ok\n"
    boots = Boots(*[stopped] * 3, "CASE a PASS ok\nCASE b PASS ok\n" + DONE)
    assert vmhost.attempt(boots, "svm", ["a", "b"], tmp_path / "svm.log") == 1
    assert boots.calls == vmhost.BOOTS_PER_HOST == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svm.log", "svm.log.1", "svm.log.2"]
    # Stopped twice, then a boot that ran to its end: that one counts.
    boots = Boots(stopped, stopped, "CASE a PASS ok\nCASE b PASS ok\n" + DONE)
    assert vmhost.attempt(boots, "svm", ["a", "b"], tmp_path / "again.log") == 0
    assert boots.calls == 3


def test_a_case_that_hung_in_a_host_that_ran_to_its_end_is_not_retried(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The guest's watchdog ended the hung case; /init went on.
    hung = (
        "CASE a PASS ok\nTimeout (0:06:40)!\nThread 0x1 (most recent call first):\n"
        '  File "/syscheck/boxlite_syscheck.py", line 1, in _python_run\n' + DONE
    )
    boots = Boots(hung)
    assert vmhost.attempt(boots, "svm", ["a", "b"], tmp_path / "svm.log") == 1
    assert boots.calls == 1
    said = capsys.readouterr().out
    assert "FAIL svm/b: not reported" in said
    assert "in _python_run" in said  # the stack is in what CI prints


def test_a_host_that_stopped_after_every_case_passed_is_not_booted_again(tmp_path: Path) -> None:
    boots = Boots("CASE a PASS ok\nKernel panic - not syncing\n")
    assert vmhost.attempt(boots, "svm", ["a"], tmp_path / "svm.log") == 0
    assert boots.calls == 1
