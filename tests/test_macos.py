"""macOS through the seams: architecture, Rosetta, kern.hv_support, HV codes."""

from __future__ import annotations

import errno
import logging

import pytest

import boxlite_syscheck as b


def sysctls(mocker, **values):
    """Patch _sysctl_int with a table; dots in names are written as __."""
    table = {name.replace("__", "."): value for name, value in values.items()}

    def read(name):
        value = table.get(name)
        if isinstance(value, OSError):
            raise value
        return value

    return mocker.patch.object(b, "_sysctl_int", side_effect=read)


def error_of(probe):
    with pytest.raises(b.BoxliteError) as caught:
        probe.startup_check()
    return caught.value


def test_arm64_with_hv_support_passes(mocker):
    sysctls(mocker, kern__hv_support=1)
    assert b.HvfProbe("arm64").acquire() == (None, None)


def test_intel_mac_is_unsupported(mocker):
    sysctls(mocker, sysctl__proc_translated=None)
    err = error_of(b.HvfProbe("x86_64"))
    assert isinstance(err, b.UnsupportedError)
    assert str(err).startswith("unsupported: Unsupported architecture: x86_64")
    assert err.cause == "macos-not-arm64"


def test_rosetta_is_told_to_use_arm64_python(mocker):
    sysctls(mocker, sysctl__proc_translated=1)
    err = error_of(b.HvfProbe("x86_64"))
    assert err.cause == "rosetta"
    assert "arm64 Python" in err.fix


@pytest.mark.parametrize("value", [0, None])
def test_hv_support_off_or_absent(mocker, value):
    sysctls(mocker, kern__hv_support=value, kern__hv_vmm_present=0)
    err = error_of(b.HvfProbe("arm64"))
    assert err.cause == "hv-unsupported"
    assert "Hypervisor.framework is not available" in str(err)


def test_hv_support_off_inside_a_vm(mocker):
    sysctls(mocker, kern__hv_support=0, kern__hv_vmm_present=1)
    err = error_of(b.HvfProbe("arm64"))
    assert err.cause == "hv-in-vm"
    assert "itself a virtual machine" in str(err)


def test_hv_support_unreadable(mocker):
    sysctls(mocker, kern__hv_support=OSError(errno.EPERM, "Operation not permitted"))
    err = error_of(b.HvfProbe("arm64"))
    assert err.cause == "hv-support-unreadable"
    assert "EPERM" in str(err)


GOOD_MAC = dict(
    kern__hv_support=1,
    kern__hv_vmm_present=0,
    kern__hv__max_address_spaces=256,
    sysctl__proc_translated=0,
)


class TestDiagnoseCreateFailure:
    @pytest.fixture
    def hvf(self, mocker):
        # This process is entitled: the probe in-process proves something.
        sysctls(mocker, **GOOD_MAC)
        mocker.patch.object(b, "_hv_entitlement", return_value=True)

        def make(code):
            create = mocker.patch.object(b, "_hv_vm_create", return_value=code)
            destroy = mocker.patch.object(b, "_hv_vm_destroy", return_value=b.HV_SUCCESS)
            return create, destroy

        return make

    original = b.EngineError("krun_start_enter failed")

    def test_no_resources(self, hvf, caplog):
        hvf(b.HV_NO_RESOURCES)
        with caplog.at_level(logging.ERROR, logger="boxlite_syscheck"):
            err = b.HvfProbe("arm64").diagnose_create_failure(self.original)
        assert isinstance(err, b.ResourceExhaustedError)
        assert "kern.hv.max_address_spaces" in str(err)
        assert "Stop some boxes" in str(err)
        assert any("HV_NO_RESOURCES" in r.getMessage() for r in caplog.records)

    def test_success_destroys_and_keeps_the_error(self, hvf):
        _, destroy = hvf(b.HV_SUCCESS)
        assert b.HvfProbe("arm64").diagnose_create_failure(self.original) is self.original
        assert destroy.call_count == 1

    def test_busy_keeps_the_error(self, hvf, caplog):
        _, destroy = hvf(b.HV_BUSY)
        with caplog.at_level(logging.DEBUG, logger="boxlite_syscheck"):
            assert b.HvfProbe("arm64").diagnose_create_failure(self.original) is self.original
        assert destroy.call_count == 0
        assert all(r.levelno == logging.DEBUG for r in caplog.records)

    def test_denied_names_the_entitlement_and_the_executable(self, hvf, mocker):
        hvf(b.HV_DENIED)
        mocker.patch.object(b.sys, "executable", "/opt/py/bin/python3")
        err = b.HvfProbe("arm64").diagnose_create_failure(self.original)
        assert isinstance(err, b.UnsupportedError)
        assert "com.apple.security.hypervisor" in str(err)
        assert "/opt/py/bin/python3" in str(err)

    def test_unsupported(self, hvf):
        hvf(b.HV_UNSUPPORTED)
        err = b.HvfProbe("arm64").diagnose_create_failure(self.original)
        assert isinstance(err, b.UnsupportedError) and "HV_UNSUPPORTED" in str(err)

    def test_other_code_is_an_engine_error_with_hex(self, hvf):
        hvf(b.HV_ERROR)
        err = b.HvfProbe("arm64").diagnose_create_failure(self.original)
        assert type(err) is b.EngineError
        assert "krun_start_enter failed" in str(err) and "0xfae94001" in str(err)

    def test_framework_not_loadable_keeps_the_error(self, mocker):
        sysctls(mocker, **GOOD_MAC)
        mocker.patch.object(b, "_hv_entitlement", return_value=True)
        mocker.patch.object(b, "_hv_vm_create", side_effect=OSError(errno.ENOENT, "no framework"))
        assert b.HvfProbe("arm64").diagnose_create_failure(self.original) is self.original


def test_hvf_is_loaded_by_absolute_path(mocker):
    load = mocker.patch.object(b, "_load_library")
    load.return_value.hv_vm_create.return_value = 0
    assert b._hv_vm_create() == b.HV_SUCCESS
    load.assert_called_once_with("/System/Library/Frameworks/Hypervisor.framework/Hypervisor")


def test_signed_codes_are_normalised(mocker):
    load = mocker.patch.object(b, "_load_library")
    load.return_value.hv_vm_create.return_value = -85377019
    assert b._hv_vm_create() == b.HV_NO_RESOURCES


def mac_report(mocker, machine="arm64", probe_hvf=False):
    mocker.patch.object(b, "_PROBE", b.HvfProbe(machine))
    return b.check(probe_hvf=probe_hvf)


class TestReport:
    def test_findings_on_a_good_mac(self, mocker):
        sysctls(
            mocker, kern__hv_support=1, kern__hv_vmm_present=0, kern__hv__max_address_spaces=None
        )
        report = mac_report(mocker)
        assert report.verdict == "usable" and report.error is None
        found = {f.id: f for f in report.findings}
        assert found["macos.arch"].status == "pass"
        assert found["macos.hv_support"].status == "pass"
        assert found["macos.vmm_present"].status == "info"
        assert found["macos.max_address_spaces"].status == "skip"
        assert "macos.hv_vm_create" not in found

    def test_probe_hvf_denied_is_info(self, mocker):
        sysctls(
            mocker, kern__hv_support=1, kern__hv_vmm_present=0, kern__hv__max_address_spaces=256
        )
        mocker.patch.object(b, "_hv_vm_create", return_value=b.HV_DENIED)
        found = {f.id: f for f in mac_report(mocker, probe_hvf=True).findings}
        assert found["macos.hv_vm_create"].status == "info"
        assert "not entitled" in found["macos.hv_vm_create"].summary
        assert found["macos.max_address_spaces"].evidence == {"kern.hv.max_address_spaces": 256}

    def test_rosetta_report_fails_with_fix(self, mocker):
        sysctls(mocker, sysctl__proc_translated=1, kern__hv_support=1)
        report = mac_report(mocker, "x86_64")
        assert report.verdict == "not-usable"
        assert report.error is not None and report.error.cause == "rosetta"


class TestUnentitledProcess:
    """The engine runs in its own signed helper; this interpreter is not
    entitled, so probing here would always say HV_DENIED."""

    @pytest.fixture(autouse=True)
    def unentitled(self, mocker):
        mocker.patch.object(b, "_hv_entitlement", return_value=False)
        self.create = mocker.patch.object(b, "_hv_vm_create")
        values = {
            "kern.hv_support": 1,
            "kern.hv_vmm_present": 0,
            "kern.hv.max_address_spaces": 256,
            "sysctl.proc_translated": 0,
        }
        mocker.patch.object(b, "_sysctl_int", side_effect=values.get)

    def refine(self, message):
        return b.HvfProbe("arm64").diagnose_create_failure(b.EngineError(message))

    def test_never_probes_in_process(self):
        self.refine("krun_start_enter failed: -22")
        assert self.create.call_count == 0

    def test_the_engines_own_denied_code_names_the_helper(self):
        err = self.refine("hv_vm_create failed: 0xfae94007")
        assert isinstance(err, b.UnsupportedError) and err.cause == "hv-denied"
        assert "engine's helper" in str(err) and "codesign -d --entitlements" in str(err)

    def test_busy_is_not_a_host_problem(self):
        err = self.refine("hv_vm_create returned -85377022")
        assert err.cause == "hv-busy" and "not a host problem" in str(err)

    def test_no_resources_from_the_engine(self):
        err = self.refine("HVF error 0xfae94005")
        assert isinstance(err, b.ResourceExhaustedError) and "256" in str(err)

    def test_without_a_code_it_reports_facts_and_claims_nothing(self):
        err = self.refine("krun_start_enter failed: -22")
        assert isinstance(err, b.EngineError) and err.cause == "hv-engine-error"
        assert "kern.hv_support = 1" in str(err) and "HV_DENIED whatever" in str(err)
        assert "entitlement" not in err.fix


def test_entitlement_is_read_through_security_framework_by_absolute_path(mocker):
    load = mocker.patch.object(b, "_load_library")
    lib = load.return_value
    lib.SecTaskCreateFromSelf.return_value = 0x1000
    lib.SecTaskCopyValueForEntitlement.return_value = 0x2000
    lib.CFGetTypeID.return_value = lib.CFBooleanGetTypeID.return_value = 21
    lib.CFBooleanGetValue.return_value = True
    assert b._hv_entitlement() is True
    paths = {call.args[0] for call in load.call_args_list}
    assert paths == {b._SECURITY_PATH, b._COREFOUNDATION_PATH}
    lib.SecTaskCopyValueForEntitlement.return_value = 0
    assert b._hv_entitlement() is False
