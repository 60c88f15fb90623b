"""Error variants: BoxLite's display prefixes and the attributes we add."""

from __future__ import annotations

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
    variants = [c for c in vars(b).values()
                if isinstance(c, type) and issubclass(c, b.BoxliteError) and c is not b.BoxliteError]
    assert len(variants) == 20
    assert all(c.__name__ in b.__all__ for c in variants)


def test_failure_carries_cause_evidence_and_fix():
    err = b._failure(b.UnsupportedError, "a-cause", "summary", tried="did x",
                     answer="EACCES (Permission denied)", fix="do y", device="10:232")
    assert err.cause == "a-cause"
    assert err.fix == "do y"
    assert err.evidence["device"] == "10:232"
    text = str(err)
    assert text.startswith("unsupported: summary")
    assert "Tried: did x" in text and "Answer: EACCES" in text and text.endswith("Fix: do y")


def test_every_cause_id_is_in_the_readme():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    source = (root / "boxlite_syscheck.py").read_text()
    readme = (root / "README.md").read_text()
    causes = set(re.findall(r'cause="([a-z0-9-]+)"', source))
    causes |= set(re.findall(r'_failure\(\s*\w+, "([a-z0-9-]+)"', source))
    causes |= {name for name, _ in b.ACCESS_RULES} - {"kvm-policy"}  # worded as the ones below
    causes |= {f"kvm-{n}-denied" for n in ("flatpak", "snap", "selinux", "apparmor",
                                            "landlock", "seccomp")} | {"kvm-access-policy"}
    assert len(causes) > 40
    missing = sorted(c for c in causes if f"`{c}`" not in readme)
    assert not missing, missing
