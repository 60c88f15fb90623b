"""Outputs for fleet tools, tried with their real consumers: node_exporter's
textfile collector, promtool (exposition lint and alert-rule unit tests),
and Node Feature Discovery's feature-file rules."""

from __future__ import annotations

import calendar
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, needs, needs_kvm, on_pvm_host, valid_document
from prometheus_client.parser import text_string_to_metric_families

import boxlite_syscheck as b

# Kubernetes label syntax (k8s.io/apimachinery validation): a DNS subdomain
# prefix and "/", then a name of at most 63 characters; values too.
NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")

HOST = {
    "host": "h",
    "system": "Linux",
    "kernel": '6.1 "odd"\\name',
    "machine": "x86_64",
    "python": "3.11",
    "probe": "kvm",
    "smoke_backend": "native",
    "native_library": None,
    "kvm_provider": "kvm_pvm",
    "engine": "libkrun",
}
EMULATED = b._render("guest-emulated", b.Facts(evidence=b.Evidence(gather=False)))
ENGINES = {"libkrun": b.WOULD_FAIL_GUEST, "qemu": b.WOULD_RUN, "crosvm": b.WOULD_NOT_START}
FAILED = b._as_checker_fault(MemoryError("no memory"))
STARTED = 1796200000.0


def report(*, error=None, engines=None, warn=False):
    findings = []
    for name, verdict in (engines or {}).items():
        row = {"verdict": verdict, "state": b.ENGINE_STATES[verdict]}
        findings.append(b.Finding(f"engine.{name}", "info", "", row))
    if warn:
        findings.append(b.Finding("guest.msrs", "warn", "a warning", fix="do it"))
    if error is not None:
        findings.append(b._failing("guest.speed", error))
    return b.Report(findings, error, dict(HOST), started=STARTED, duration_s=0.0123)


def outcome(rep=None, failure=None, **kwargs):
    return b._Outcome(rep, failure, started=STARTED, duration_s=0.0123, **kwargs)


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Each family's samples, as prometheus_client's own parser reads them."""
    return {
        family.name: [(s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


def holding(rows: list[tuple[dict[str, str], float]], label: str) -> list[str]:
    return [labels[label] for labels, value in rows if value == 1]


# ── Prometheus: the conventions ─────────────────────────────────────────────


def test_verdict_and_cause_are_state_sets_with_every_state_and_one_holding():
    got = samples(b._prometheus(outcome(report(error=EMULATED, engines=ENGINES))))
    assert [labels["verdict"] for labels, _ in got["boxlite_syscheck_verdict"]] == list(b.VERDICTS)
    assert holding(got["boxlite_syscheck_verdict"], "verdict") == ["not-usable"]
    causes = [labels["cause"] for labels, _ in got["boxlite_syscheck_cause"]]
    assert set(causes) == {"none"} | {key.split("/")[0] for key in b._causes()}
    assert holding(got["boxlite_syscheck_cause"], "cause") == ["guest-emulated"]
    assert got["boxlite_syscheck_usable"] == [({"engine": "libkrun"}, 0.0)]
    assert got["boxlite_syscheck_check_success"] == [({}, 1.0)]
    assert got["boxlite_syscheck_last_run_timestamp_seconds"] == [({}, STARTED)]
    assert got["boxlite_syscheck_check_duration_seconds"] == [({}, 0.0123)]


def test_a_usable_host_says_cause_none_and_never_an_empty_label():
    text = b._prometheus(outcome(report()))
    got = samples(text)
    assert holding(got["boxlite_syscheck_cause"], "cause") == ["none"]
    assert holding(got["boxlite_syscheck_verdict"], "verdict") == ["usable"]
    assert '=""' not in text


def test_engines_are_zero_or_one_and_their_verdict_a_state_without_free_text():
    text = b._prometheus(outcome(report(error=EMULATED, engines=ENGINES)))
    got = samples(text)
    runs = {labels["engine"]: value for labels, value in got["boxlite_syscheck_engine_would_run"]}
    assert runs == {"libkrun": 0.0, "qemu": 1.0, "crosvm": 0.0}
    assert all(set(labels) == {"engine"} for labels, _ in got["boxlite_syscheck_engine_would_run"])
    verdicts = got["boxlite_syscheck_engine_verdict"]
    assert len(verdicts) == len(ENGINES) * len(b.ENGINE_STATES)
    held = {labels["engine"]: labels["verdict"] for labels, value in verdicts if value == 1}
    assert held == {"libkrun": "would-fail-guest", "qemu": "would-run", "crosvm": "would-not-start"}
    assert "would start but" not in text


def test_info_carries_only_what_does_not_change_between_runs():
    got = samples(b._prometheus(outcome(report(error=EMULATED))))
    [(labels, value)] = got["boxlite_syscheck_info"]
    assert set(labels) == {"version", "kernel", "kvm_provider"} and value == 1
    assert labels["kernel"] == '6.1 "odd"\\name'  # escaped, and read back as it was
    assert labels["kvm_provider"] == "kvm_pvm"


def test_strict_is_in_the_data_not_only_in_the_exit_code():
    lenient = samples(b._prometheus(outcome(report(warn=True))))
    strict = samples(b._prometheus(outcome(report(warn=True), strict=True)))
    assert (
        lenient["boxlite_syscheck_usable"][0][1] == 1
        and lenient["boxlite_syscheck_strict"][0][1] == 0
    )
    assert (
        strict["boxlite_syscheck_usable"][0][1] == 0
        and strict["boxlite_syscheck_strict"][0][1] == 1
    )
    for got in (lenient, strict):  # the verdict itself stays the truth
        assert holding(got["boxlite_syscheck_verdict"], "verdict") == ["usable-with-warnings"]


def test_the_checkers_failure_is_data():
    got = samples(b._prometheus(outcome(None, FAILED)))
    assert got["boxlite_syscheck_check_success"] == [({}, 0.0)]
    assert got["boxlite_syscheck_last_run_timestamp_seconds"] == [({}, STARTED)]
    assert holding(got["boxlite_syscheck_cause"], "cause") == ["checker-failed"]
    # Nothing is known about the host: no verdict, no usable, no engines.
    assert not {"boxlite_syscheck_usable", "boxlite_syscheck_verdict"} & set(got)
    assert "boxlite_syscheck_engine_would_run" not in got


OUTCOMES = {
    "not-usable": lambda: outcome(report(error=EMULATED, engines=ENGINES)),
    "usable": lambda: outcome(report()),
    "strict": lambda: outcome(report(warn=True), strict=True),
    "checker-failed": lambda: outcome(None, FAILED),
}


@needs("promtool")
@pytest.mark.parametrize("case", OUTCOMES)
def test_promtool_check_metrics_is_clean(case):
    text = b._prometheus(OUTCOMES[case]()) + "\n"
    done = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


# ── NFD: the feature file ───────────────────────────────────────────────────


def feature_file(text: str) -> tuple[float, dict[str, str]]:
    """The expiry (Unix time) and the labels, checked as NFD checks them."""
    head, *lines = text.splitlines()
    directive = re.fullmatch(r"# \+expiry-time=(\S+)", head)
    assert directive, head
    expiry = calendar.timegm(time.strptime(directive.group(1), "%Y-%m-%dT%H:%M:%SZ"))
    labels = {}
    for line in lines:
        key, _, value = line.partition("=")
        prefix, _, name = key.rpartition("/")
        assert prefix == "feature.node.kubernetes.io", key  # fully qualified, allowed
        assert len(prefix) <= 253 and PREFIX.match(prefix) and NAME.match(name), key
        assert VALUE.match(value), value
        labels[name] = value
    assert len(text.encode()) < 64 * 1024  # NFD's cap on a feature file
    return expiry, labels


@pytest.mark.parametrize("case", OUTCOMES)
def test_nfd_labels_are_qualified_valid_and_expire(case):
    run = OUTCOMES[case]()
    expiry, labels = feature_file(b._nfd(run, 600))
    assert expiry == int(STARTED) + 600
    assert labels["boxlite-kvm-checked"] == ("false" if case == "checker-failed" else "true")
    assert labels["boxlite-kvm-cause"] == run.cause and labels["boxlite-kvm-engine"] == "libkrun"
    if case == "checker-failed":
        assert "boxlite-kvm-usable" not in labels  # unknown is not "false"
    else:
        usable = {"not-usable": "false", "usable": "true", "strict": "false"}[case]
        assert labels["boxlite-kvm-usable"] == usable


def test_nfd_values_are_made_valid():
    assert b._k8s_label_value("would start but its guest would fail") == (
        "would-start-but-its-guest-would-fail"
    )
    assert VALUE.match(b._k8s_label_value("x" * 100 + "!"))
    assert b._k8s_label_value("6.18.44-fc-v595") == "6.18.44-fc-v595"


@needs_kvm
def test_nfd_has_engine_labels_with_engine_none_too(capsys):
    assert b.main(["--format", "nfd", "--engine", "none"]) == 0
    _, labels = feature_file(capsys.readouterr().out)
    assert labels["boxlite-kvm-engine"] == "none"
    assert {f"boxlite-kvm-{name}" for name in b.ENGINES} <= set(labels)
    # The engines' labels are the default check's verdicts.
    engines = b.check().engines
    for name, row in engines.items():
        assert labels[f"boxlite-kvm-{name}"] == (
            "true" if row["verdict"] == b.WOULD_RUN else "false"
        )


# ── Exit codes by format ────────────────────────────────────────────────────

EXITS = {  # case: (text, json, prometheus, nfd, prometheus --gate, nfd --gate)
    "usable": (0, 0, 0, 0, 0, 0),
    "not-usable": (1, 1, 0, 0, 1, 1),
    "strict": (1, 1, 0, 0, 1, 1),
    "checker-failed": (3, 3, 0, 0, 3, 3),
}
FORMATS = (
    [],
    ["--json"],
    ["--format", "prometheus"],
    ["--format", "nfd"],
    ["--format", "prometheus", "--gate"],
    ["--format", "nfd", "--gate"],
)


@pytest.mark.parametrize("case", EXITS)
def test_exit_codes_by_format(case, mocker, capsys):
    if case == "checker-failed":
        mocker.patch.object(b, "check", side_effect=FAILED)
    else:
        rep = {
            "usable": report(),
            "not-usable": report(error=EMULATED),
            "strict": report(warn=True),
        }
        mocker.patch.object(b, "check", return_value=rep[case])
    strict = ["--strict"] if case == "strict" else []
    codes = tuple(b.main([*argv, *strict]) for argv in FORMATS)
    assert codes == EXITS[case]
    out = capsys.readouterr().out
    if case == "checker-failed":  # the fleet formats and JSON still carry it
        assert out.count("boxlite_syscheck_check_success 0") == 2
        assert out.count("boxlite-kvm-checked=false") == 2 and '"check_success": false' in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--format", "prometheus", "--quiet"],
        ["--format", "json", "--gate"],
        ["--format", "prometheus", "--expiry", "60"],
        ["--format", "nfd", "--expiry", "0"],
        ["--format", "nfd", "--timeout", "-1"],
        ["--format", "nfd", "--bogus"],
    ],
)
def test_a_usage_error_creates_nothing(argv, tmp_path, capsys):
    target = tmp_path / "boxlite.prom"
    assert b.main([*argv, "--output", str(target)]) == 2
    assert list(tmp_path.iterdir()) == []
    assert "error:" in capsys.readouterr().err


# ── --output: atomic, and the last good file kept ───────────────────────────


def cli(*argv: str, prefix: list[str] | None = None, **kwargs) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **kwargs.pop("env", {})}
    return subprocess.run(
        [*(prefix or [sys.executable]), "-m", "boxlite_syscheck", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        **kwargs,
    )


@needs("strace")
def test_output_goes_through_a_dot_file_fsync_and_rename(tmp_path):
    target = tmp_path / "boxlite-syscheck"
    trace = tmp_path.parent / f"{tmp_path.name}.strace"
    calls = "trace=openat,rename,renameat,renameat2,fsync"
    strace = ["strace", "-f", "-o", str(trace), "-e", calls, sys.executable]
    done = cli("--format", "nfd", "--output", str(target), prefix=strace)
    assert done.returncode == 0, done.stderr
    calls = [line.split(None, 1)[1] for line in trace.read_text().splitlines()]
    trace.unlink()
    opened = [c for c in calls if c.startswith("openat") and f"{tmp_path}/." in c]
    assert len(opened) == 1 and "O_EXCL" in opened[0] and "O_CLOEXEC" in opened[0], opened
    temporary = re.search(r'"([^"]+)"', opened[0]).group(1)
    assert os.path.basename(temporary).startswith(".")  # NFD skips dot-files
    index = calls.index(opened[0])
    rest = calls[index:]
    renamed = next(i for i, c in enumerate(rest) if c.startswith("rename"))
    assert f'"{temporary}"' in rest[renamed] and f'"{target}"' in rest[renamed]
    assert any(c.startswith("fsync") for c in rest[:renamed])  # the data, before the rename
    after = rest[renamed + 1 :]
    folder = next(i for i, c in enumerate(after) if c.startswith("openat") and "O_DIRECTORY" in c)
    assert any(c.startswith("fsync") for c in after[folder:])  # then the directory
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    feature_file(target.read_text())


def test_a_failed_write_keeps_the_last_good_file(tmp_path):
    target = tmp_path / "boxlite_syscheck.prom"
    target.write_text("# the last good report\n")

    def small_files() -> None:  # writes past 512 bytes fail with EFBIG
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))

    done = cli("--format", "prometheus", "--output", str(target), preexec_fn=small_files)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "cannot write the report" in done.stderr and "EFBIG" in done.stderr
    assert target.read_text() == "# the last good report\n"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary left


# ── The real consumers: node_exporter and promtool ──────────────────────────


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def node_exporter(tmp_path):
    """Debian's prometheus-node-exporter on 127.0.0.1, with only the textfile
    collector, reading a directory of the test's; yields (dir, scrape)."""
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    port = free_port()
    argv = [
        "prometheus-node-exporter",
        f"--web.listen-address=127.0.0.1:{port}",
        "--collector.disable-defaults",
        "--collector.textfile",
        f"--collector.textfile.directory={textfiles}",
    ]
    exporter = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def scrape() -> dict[str, list[tuple[dict[str, str], float]]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return samples(answer.read().decode())

    try:
        for _ in range(200):
            try:
                scrape()
                break
            except OSError:
                assert exporter.poll() is None, exporter.stderr.read() if exporter.stderr else ""
                time.sleep(0.05)
        else:
            pytest.fail("node_exporter did not answer within 10 s")
        yield textfiles, scrape
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)


def value(scraped, name, **labels) -> float:
    rows = [
        v for got, v in scraped.get(name, []) if all(got.get(k) == w for k, w in labels.items())
    ]
    assert len(rows) == 1, (name, labels, scraped.get(name))
    return rows[0]


RECIPES = {  # how the report gets into the collector's directory
    "--output": "{cli} --format prometheus --output boxlite_syscheck.prom",
    "tmp && mv": "{cli} --format prometheus > boxlite_syscheck.prom.$$ && mv boxlite_syscheck.prom.$$ boxlite_syscheck.prom",
    "| sponge": "set -o pipefail; {cli} --format prometheus | sponge boxlite_syscheck.prom",
}


def shell(recipe: str, where: Path, env: dict[str, str] | None = None) -> None:
    command = recipe.format(cli=f"{sys.executable} -m boxlite_syscheck")
    done = subprocess.run(
        ["bash", "-ec", command],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    assert done.returncode == 0, done.stderr  # the data got through `set -e`


@on_pvm_host
@needs("prometheus-node-exporter", "sponge")
@pytest.mark.parametrize("recipe", RECIPES)
def test_node_exporter_serves_this_hosts_verdict(node_exporter, recipe):
    textfiles, scrape = node_exporter
    before = time.time()
    shell(RECIPES[recipe], textfiles)
    scraped = scrape()
    assert value(scraped, "node_textfile_scrape_error") == 0
    assert value(scraped, "boxlite_syscheck_check_success") == 1
    assert value(scraped, "boxlite_syscheck_usable", engine="libkrun") == 0
    assert value(scraped, "boxlite_syscheck_cause", cause="guest-emulated-pvm") == 1
    assert value(scraped, "boxlite_syscheck_verdict", verdict="not-usable") == 1
    assert value(scraped, "boxlite_syscheck_engine_would_run", engine="qemu") == 0
    assert value(scraped, "boxlite_syscheck_info", kvm_provider="kvm_pvm") == 1
    ran = value(scraped, "boxlite_syscheck_last_run_timestamp_seconds")
    assert before - 1 <= ran <= time.time()
    assert sorted(p.name for p in textfiles.iterdir()) == ["boxlite_syscheck.prom"]


@needs("prometheus-node-exporter", "sponge")
@pytest.mark.parametrize("recipe", RECIPES)
def test_node_exporter_serves_the_checkers_failure(node_exporter, recipe):
    textfiles, scrape = node_exporter
    missing = {b.LIBRARY_ENV: "/nonexistent/libkvmsmoke.so"}  # the checker cannot run
    shell(RECIPES[recipe].replace("--format", "--backend native --format"), textfiles, missing)
    scraped = scrape()
    assert value(scraped, "node_textfile_scrape_error") == 0
    assert value(scraped, "boxlite_syscheck_check_success") == 0
    assert value(scraped, "boxlite_syscheck_cause", cause="native-missing") == 1
    assert "boxlite_syscheck_usable" not in scraped  # no verdict: nothing is known
    assert value(scraped, "boxlite_syscheck_last_run_timestamp_seconds") > 0


def readme_block(marker: str, language: str) -> str:
    found = re.findall(
        rf"<!-- {marker} -->\n```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.S
    )
    assert len(found) == 1, marker
    return str(found[0])


# promtool's alert unit tests, over the README's rules: the verdict alert
# names the cause; the check failing, going stale and going missing alert.
RULE_TESTS = """
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'boxlite_syscheck_usable{instance="a",job="node",engine="libkrun"}'
        values: '0x30'
      - series: 'boxlite_syscheck_cause{instance="a",job="node",cause="guest-emulated-pvm"}'
        values: '1x30'
      - series: 'boxlite_syscheck_cause{instance="a",job="node",cause="none"}'
        values: '0x30'
      - series: 'boxlite_syscheck_check_success{instance="a",job="node"}'
        values: '1x30'
      - series: 'boxlite_syscheck_last_run_timestamp_seconds{instance="a",job="node"}'
        values: '0+60x30'
      - series: 'boxlite_syscheck_usable{instance="b",job="node",engine="libkrun"}'
        values: '1x30'
      - series: 'boxlite_syscheck_check_success{instance="b",job="node"}'
        values: '1x30'
      - series: 'boxlite_syscheck_last_run_timestamp_seconds{instance="b",job="node"}'
        values: '0+60x30'
      - series: 'up{instance="a",job="node"}'
        values: '1x30'
      - series: 'up{instance="b",job="node"}'
        values: '1x30'
    alert_rule_test:
      - eval_time: 20m
        alertname: MicroVMHostCannotRunGuests
        exp_alerts:
          - exp_labels: {instance: a, job: node, engine: libkrun, severity: warning}
            exp_annotations:
              summary: "a cannot run libkrun guests: guest-emulated-pvm"
              description: "see `boxlite-syscheck` on a for the evidence and the fix"
      - eval_time: 20m
        alertname: MicroVMHostCheckFailed
        exp_alerts: []
      - eval_time: 20m
        alertname: MicroVMHostCheckStale
        exp_alerts: []
      - eval_time: 20m
        alertname: MicroVMHostCheckMissing
        exp_alerts: []
  - interval: 1m
    input_series:
      - series: 'boxlite_syscheck_check_success{instance="a",job="node"}'
        values: '0x60'
      - series: 'boxlite_syscheck_last_run_timestamp_seconds{instance="a",job="node"}'
        values: '0+60x60'
    alert_rule_test:
      - eval_time: 45m
        alertname: MicroVMHostCheckFailed
        exp_alerts:
          - exp_labels: {instance: a, job: node, severity: warning}
            exp_annotations:
              summary: "the host check itself fails on a: nothing is known about the host"
  - interval: 1m
    input_series:
      # The timer stopped: the file stays, with the time of its last run.
      - series: 'boxlite_syscheck_check_success{instance="a",job="node"}'
        values: '1x200'
      - series: 'boxlite_syscheck_last_run_timestamp_seconds{instance="a",job="node"}'
        values: '0x200'
      - series: 'up{instance="a",job="node"}'
        values: '1x200'
      # The file was removed: node_exporter is up, the metrics are gone.
      - series: 'up{instance="c",job="node"}'
        values: '1x200'
    alert_rule_test:
      - eval_time: 1h
        alertname: MicroVMHostCheckStale
        exp_alerts: []
      - eval_time: 3h
        alertname: MicroVMHostCheckStale
        exp_alerts:
          - exp_labels: {instance: a, job: node, severity: warning}
            exp_annotations:
              summary: "the host check has not run on a for over 2 hours"
      - eval_time: 3h
        alertname: MicroVMHostCheckMissing
        exp_alerts:
          - exp_labels: {instance: c, job: node, severity: warning}
            exp_annotations:
              summary: "c publishes no host check"
  - interval: 1m
    input_series:
      - series: 'up{instance="c",job="node"}'
        values: '1x200'
    alert_rule_test:
      - eval_time: 3h
        alertname: MicroVMFleetCheckAbsent
        exp_alerts:
          - exp_labels: {severity: warning}
            exp_annotations:
              summary: "no host in the fleet publishes the host check"
"""


@needs("promtool")
def test_the_readmes_alert_rules_fire_as_it_says(tmp_path):
    rules = tmp_path / "boxlite-syscheck.rules.yml"
    rules.write_text(readme_block("alert-rules", "yaml"))
    checked = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = tmp_path / "tests.yml"
    tests.write_text(f"rule_files: [{rules.name}]\n" + textwrap.dedent(RULE_TESTS))
    done = subprocess.run(
        ["promtool", "test", "rules", tests.name], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs("prometheus-node-exporter", "sponge")
def test_the_readmes_recipes_work_as_written(node_exporter, tmp_path):
    textfiles, scrape = node_exporter
    features = tmp_path / "features.d"
    features.mkdir()
    script = readme_block("fleet-recipes", "sh")
    script = script.replace("/var/lib/prometheus/node-exporter", str(textfiles))
    script = script.replace("/etc/kubernetes/node-feature-discovery/features.d", str(features))
    script = script.replace("boxlite-syscheck ", f"{sys.executable} -m boxlite_syscheck ")
    done = subprocess.run(
        ["bash", "-ec", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert value(scrape(), "boxlite_syscheck_check_success") == 1
    assert [p.name for p in features.iterdir()] == ["boxlite-syscheck"]
    _, labels = feature_file((features / "boxlite-syscheck").read_text())
    assert labels["boxlite-kvm-checked"] == "true"


# ── JSON: the schema ────────────────────────────────────────────────────────


def test_the_schema_knows_every_cause_error_class_and_engine():
    schema = json.loads((ROOT / "boxlite_syscheck.schema.json").read_text())
    defs = schema["$defs"]
    assert set(defs["error"]["properties"]["cause"]["enum"]) == {
        k.split("/")[0] for k in b._causes()
    }
    classes = {cls.__name__ for cls in b.BoxliteError.__subclasses__()}
    assert set(defs["error"]["properties"]["type"]["enum"]) == classes
    assert defs["host"]["properties"]["engine"]["enum"] == [*b.ENGINES, "none"]
    assert schema["properties"]["schema_version"]["const"] == b.SCHEMA_VERSION


def test_documents_out_of_the_schema_are_refused():
    good = report(error=EMULATED, engines={}).as_dict()
    valid_document(json.loads(json.dumps(good)))
    for broken in (
        {**good, "verdict": "fine"},
        {**good, "check_success": False},  # a failure has no verdict
        {**good, "error": None},  # not usable names its cause
        {**good, "timestamp": "yesterday"},
    ):
        with pytest.raises(AssertionError):
            valid_document(json.loads(json.dumps(broken)))


@needs_kvm
def test_the_json_document_says_when_and_how_long(capsys):
    before = time.time()
    b.main(["--json", "--engine", "none"])
    document = valid_document(json.loads(capsys.readouterr().out))
    ran = calendar.timegm(time.strptime(document["timestamp"], "%Y-%m-%dT%H:%M:%SZ"))
    assert int(before) - 1 <= ran <= time.time()
    assert 0 < document["duration_seconds"] < 60
    assert document["check_success"] is True and document["host"]["engine"] == "none"
