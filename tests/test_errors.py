"""Error variants: BoxLite's display prefixes and the attributes we add."""

from __future__ import annotations

import errno

import pytest

import boxlite_syscheck as b

PREFIXES = [
    (b.EngineError, "engine reported an error: "),
    (b.ConfigError, "configuration error: "),
    (b.StorageError, "storage error: "),
    (b.ImageError, "images error: "),
    (b.PortalError, "portal error: "),
    (b.NetworkError, "network error: "),
    (b.RpcError, "gRPC/tonic error: "),
    (b.RpcTransportError, "gRPC transport error: "),
    (b.InternalError, "internal error: "),
    (b.ExecutionError, "Execution error: "),
    (b.UnsupportedError, "unsupported: "),
    (b.NotFoundError, "box not found: "),
    (b.AlreadyExistsError, "already exists: "),
    (b.InvalidStateError, "invalid state: "),
    (b.DatabaseError, "database error: "),
    (b.MetadataError, "metadata error: "),
    (b.InvalidArgumentError, "invalid argument: "),
    (b.StoppedError, "stopped: "),
    (b.ResourceExhaustedError, "resource exhausted: "),
]


@pytest.mark.parametrize(("cls", "prefix"), PREFIXES, ids=lambda v: getattr(v, "__name__", ""))
def test_display_is_prefix_then_detail(cls, prefix):
    err = cls("the detail")
    assert str(err) == prefix + "the detail"
    assert err.detail == "the detail"
    assert isinstance(err, b.BoxliteError)
    assert isinstance(err, RuntimeError)


def test_unsupported_engine_has_no_detail():
    assert str(b.UnsupportedEngineError()) == "unsupported engine kind"
    assert str(b.UnsupportedEngineError("ignored")) == "unsupported engine kind"


def test_all_twenty_variants_are_exported():
    variants = [
        c
        for c in vars(b).values()
        if isinstance(c, type) and issubclass(c, b.BoxliteError) and c is not b.BoxliteError
    ]
    assert len(variants) == 20
    assert all(c.__name__ in b.__all__ for c in variants)


def test_an_error_the_rules_name_carries_cause_evidence_and_fix():
    facts = b.Facts(evidence=b.Evidence(gather=False, kernel="6.1.0"))
    facts.smoke = b.SmokeResult("native")
    facts.smoke.step, facts.smoke.error = b.STEP_CREATE_VM, errno.EBUSY
    err = b._diagnose(facts)
    assert err.cause == "kvm-busy" and err.fix.startswith("quit the other hypervisor")
    assert err.evidence["answer"] == "EBUSY (Device or resource busy)"
    text = str(err)
    assert text.startswith("unsupported: KVM cannot create a VM")
    assert "Tried: create a VM (KVM_CREATE_VM)" in text and text.endswith("Fix: " + err.fix)
