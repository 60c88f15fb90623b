"""Outputs for fleet tools: Prometheus textfile and Node Feature Discovery."""

from __future__ import annotations

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

import boxlite_syscheck as b

# Kubernetes label syntax (k8s.io/apimachinery validation): an optional DNS
# subdomain prefix and "/", then a name of at most 63 characters; values too.
NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def report(*, error=None, engines=None):
    findings = []
    for name, verdict in (engines or {}).items():
        findings.append(b.Finding(f"engine.{name}", "info", "", {"verdict": verdict}))
    if error is not None:
        fail = b.Finding("guest.speed", "fail", "emulated")
        fail.error = error
        findings.append(fail)
    host = {"engine": "libkrun", "kernel": '6.1 "odd"\\name', "kvm_provider": "kvm_pvm"}
    return b.Report(findings, error, host)


EMULATED = b.UnsupportedError("emulated", cause="guest-emulated-pvm")
ENGINES = {"libkrun": b.WOULD_FAIL_GUEST, "qemu": b.WOULD_RUN, "crosvm": b.WOULD_NOT_START}


def test_prometheus_output_parses_with_prometheus_clients_own_parser():
    text = b._prometheus(report(error=EMULATED, engines=ENGINES), 0.0123)
    families = {f.name: f for f in text_string_to_metric_families(text + "\n")}
    usable = families["boxlite_syscheck_usable"].samples
    assert [(s.labels, s.value) for s in usable] == [({"engine": "libkrun"}, 0.0)]
    runs = {
        s.labels["engine"]: s.value for s in families["boxlite_syscheck_engine_would_run"].samples
    }
    assert runs == {"libkrun": 0.0, "qemu": 1.0, "crosvm": 0.0}
    assert families["boxlite_syscheck_check_duration_seconds"].samples[0].value == 0.0123
    info = families["boxlite_syscheck_info"].samples[0].labels
    assert info["cause"] == "guest-emulated-pvm" and info["verdict"] == "not-usable"
    assert info["kernel"] == '6.1 "odd"\\name'  # escaped, and read back as it was


def test_prometheus_usable_host_without_engines():
    text = b._prometheus(report(), 0.001)
    families = {f.name for f in text_string_to_metric_families(text + "\n")}
    assert "boxlite_syscheck_engine_would_run" not in families
    assert "boxlite_syscheck_usable" in families


@pytest.mark.parametrize("error, engines", [(EMULATED, ENGINES), (None, {})])
def test_nfd_feature_file_has_valid_label_names_and_values(error, engines):
    lines = b._nfd(report(error=error, engines=engines)).splitlines()
    assert lines
    for line in lines:
        key, _, value = line.partition("=")
        prefix, _, name = key.rpartition("/")
        assert NAME.match(name), name
        assert not prefix or (len(prefix) <= 253 and PREFIX.match(prefix)), prefix
        assert VALUE.match(value), value
    labels = dict(line.split("=", 1) for line in lines)
    assert labels["boxlite-kvm-usable"] == ("false" if error else "true")


def test_nfd_values_are_made_valid():
    assert b._k8s_label_value("would start but its guest would fail") == (
        "would-start-but-its-guest-would-fail"
    )
    assert VALUE.match(b._k8s_label_value("x" * 100 + "!"))
    assert b._k8s_label_value("6.18.44-fc-v595") == "6.18.44-fc-v595"
