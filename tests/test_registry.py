"""The cause registry and the rule table: every cause renders, every rule
names a cause, and the README's tables say what the data says."""

from __future__ import annotations

import errno
import re

import pytest
from conftest import KVM_NODE, ROOT

import boxlite_syscheck as b


def sample() -> b.Facts:
    """Facts with every value some cause's text may ask for."""
    ev = b.Evidence(
        gather=False,
        euid=1000,
        groups=(1000,),
        user="alice",
        node=dict(KVM_NODE),
        acl=[
            {"tag": "user_obj", "perm": 6, "id": None},
            {"tag": "user", "perm": 0, "id": 1000},
            {"tag": "mask", "perm": 6, "id": None},
        ],
        mount={
            "point": "/dev",
            "fstype": "tmpfs",
            "options": ["rw", "nodev"],
            "root": "/",
            "source": "none",
        },
        bind_mounted=False,
        group_listed=True,
        group_named=True,
        kvm_group=True,
        userns={"identity": False, "uid_map": "0 1000 1", "gid_map": "0 1000 1"},
        runtime="docker",
        runtime_evidence=["a docker cgroup"],
        private_dev=True,
        cgroup={"devices": "/docker/1", "devices_list": ["c 1:3 rwm"], "unified": "/"},
        systemd_unit="box.service",
        wsl="2",
        snap="firefox",
        no_new_privs=True,
        seccomp="2",
        landlock_abi=7,
        lsm=["landlock"],
        lsm_context="unconfined",
        arch="x86_64",
        cpu_flags={"vmx"},
        vendor="GenuineIntel",
        kernel="6.1.0-amd64",
        kvm_modules=["kvm_intel", "kvm"],
        kvm_registered=True,
        kvm_provider="kvm_intel",
        module_available={"kvm_pvm": False},
        rlimit_nofile=(1024, 4096),
        file_max="1000000",
    )
    facts = b.Facts("linux", "x86_64", engine="libkrun", evidence=ev)
    facts.open_errno = errno.EACCES
    facts.caps = {"IRQCHIP": 0, "SET_TSS_ADDR": 1}
    facts.ioctls = {"KVM_CREATE_IRQCHIP": errno.EINVAL}
    smoke = facts.smoke = b.SmokeResult("native", guest="long-mode")
    smoke.step, smoke.exit_reason, smoke.api_version = b.STEP_DONE, b.KVM_EXIT_INTERNAL_ERROR, 11
    smoke.internal_suberror, smoke.instruction, smoke.rip = 1, "lock cmpxchg16b", 0x4032
    smoke.insn_bytes = bytes.fromhex("f0480fc70f")
    smoke.cpuid = {"cx16": True, "xsave": True, "arch_capabilities": True}
    smoke.speed = b.Speed(1500.0, 0.5, 1024)
    smoke.msrs = {
        "boot_msrs_set": 3,
        "boot_msr_refused": "STAR",
        "arch_capabilities": {"value": "0x69", "accepted": False},
    }
    facts.sysctls = {
        "kern.hv_support": 0,
        "kern.hv_vmm_present": 1,
        "kern.hv.max_address_spaces": 256,
        "sysctl.proc_translated": 1,
    }
    facts.hv, facts.entitled = (b.HV_DENIED, "engine"), False
    facts.message = "krun_start_enter failed: Error(13)"
    facts.decoded = ["errno 13 is EACCES (Permission denied)"]
    facts.note = "libkvmsmoke.so does not exist"
    deep = facts.deep = b.BootResult("native", 30.0)
    deep.kernel, deep.kernel_path = "Linux 6.12.87, libkrunfw", "/x/libkrunfw.so.5"
    deep.mem_size, deep.elapsed, deep.step, deep.error = (
        64 << 20,
        6.2,
        b.STEP_SET_LAPIC,
        errno.EINVAL,
    )
    deep.milestones = {"loaded": 0.02, "version": 0.57}
    deep.exits = {"IO": 20, "INTERNAL_ERROR": 1}
    deep.exit_reason, deep.internal_suberror, deep.rip = (
        b.KVM_EXIT_INTERNAL_ERROR,
        1,
        0xFFFFFFFF812A7652,
    )
    deep.instruction, deep.insn_bytes = "lock cmpxchg16b", bytes.fromhex("f0490fc74820")
    deep.console = "Calibrating delay loop (skipped), value calculated using timer frequency"
    deep.panic = "Kernel panic - not syncing: Attempted to kill the idle task!"
    return facts


@pytest.mark.parametrize("key", sorted(b._causes()))
def test_every_cause_renders_from_facts(key):
    error = b._render(key, sample())  # the strict render: every value is there
    text = error.detail
    assert error.cause == key.split("/")[0]
    assert isinstance(error, b.BoxliteError) and type(error) is not b.BoxliteError
    assert len(error.summary) <= 160, (len(error.summary), error.summary)
    assert not re.search(r"\bNone\b", text), text
    assert not re.search(r"\{[a-z_]+\}", text), text  # no value left unfilled
    assert "{'" not in text and "['" not in text and "object at 0x" not in text, text
    lines = text.split("\n")
    assert [line for line in lines if line.startswith("Fix:")] == [f"Fix: {error.fix}"]
    assert "Fix:" not in error.fix and error.fix.strip()
    assert lines[2].startswith("Tried: ") and lines[3].startswith("Answer: "), text
    assert error.evidence["tried"] and error.evidence["answer"]


def test_every_rule_names_a_cause_and_every_cause_has_a_rule():
    keys = [key for key, _ in b.RULES]
    assert len(keys) == len(set(keys))
    assert set(keys) <= set(b._causes())
    unruled = set(b._causes()) - set(keys)
    assert unruled == {"native-missing", "checker-failed"}  # the checker's own failures


def test_a_cause_a_value_is_missing_for_still_renders_without_none(mocker):
    facts = b.Facts(evidence=b.Evidence(gather=False))
    facts.open_errno = errno.ENOENT
    error = b._render("kvm-node-missing", facts)
    assert "None" not in str(error) and error.fix


def test_the_layers_are_findings_or_the_engine_or_the_checker():
    layers = {cause.layer for cause in b._causes().values()}
    assert layers == {
        "platform",
        "macos.arch",
        "macos.hv_support",
        "macos.hv_vm_create",
        "kvm.device",
        "kvm.smoke",
        "engine",
        "guest.speed",
        "guest.stock_kernel",
        "guest.msrs",
        "deep.boot",
        "checker",
    }


# ── The README says what the data says ──────────────────────────────────────


def readme_table(heading: str) -> list[list[str]]:
    """The rows of the first table after a heading, as lists of cells."""
    text = (ROOT / "README.md").read_text()
    after = text.split(heading, 1)[1]
    rows = []
    for line in after.split("\n"):
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # the header and its rule


def test_the_readme_cause_table_lists_the_registry():
    rows = readme_table("### Causes")
    listed = [re.fullmatch(r"`([a-z0-9-]+)`", row[0]).group(1) for row in rows]
    assert len(listed) == len(set(listed))
    causes = {key.split("/")[0]: cause for key, cause in b._causes().items()}
    assert set(listed) == set(causes)
    for row in rows:
        cause = causes[row[0].strip("`")]
        assert row[1] == cause.cls.__name__, row
        assert row[2] == f"`{cause.layer}`", row


def test_the_readme_engine_table_is_engine_requirements():
    rows = readme_table("### What each engine needs")
    assert [row[0] for row in rows] == list(b.ENGINES)
    for name, x86, arm, ioctls, *_ in rows:
        row = b.ENGINE_REQUIREMENTS[name]
        assert x86.split(", ") == list(row["required"]["x86_64"]), name
        assert arm.split(", ") == list(row["required"]["aarch64"]), name
        assert ioctls.split(", ") == list(row["ioctls"]), name


def _block(name: str) -> tuple[tuple[str, object], ...]:
    keys = [key for key, _ in b.RULES]
    spans = [range(keys.index(first), keys.index(last) + 1) for first, last in b._RULE_BLOCKS[name]]
    return tuple(b.RULES[i] for span in spans for i in span)


def test_the_blocks_are_runs_of_rules_in_order_and_never_overlap():
    seen: set[str] = set()
    for name in b._RULE_BLOCKS:
        keys = [key for key, _ in _block(name)]
        assert keys, name
        assert not seen & set(keys), name
        seen |= set(keys)
    without = b._rules_without(*b._RULE_BLOCKS)
    assert [key for key, _ in without] == [key for key, _ in b.RULES if key not in seen]


def passed_guest() -> b.SmokeResult:
    """A real-mode guest that ran, halted and proved itself."""
    smoke = b.SmokeResult("native", guest="real-mode")
    smoke.step, smoke.proof, smoke.exit_reason = b.STEP_DONE, b.PROOF_VALUE, b.KVM_EXIT_HLT
    assert smoke.ok
    return smoke


@pytest.mark.parametrize("block", sorted(b._RULE_BLOCKS))
def test_a_skipped_block_of_rules_cannot_hold_without_its_facts(block):
    # _diagnose leaves out the macOS block on Linux, the failure block when
    # no OS call failed, the capabilities' when none was asked, the guest's
    # when it passed (or did not run), the MSRs' when none was set, the
    # deep boot's when it did not run, and the complete block's before every
    # stage has answered; each of their rules must then be false, whatever
    # else the facts say (here: everything else a cause can show).
    rules = _block(block)
    full = sample()
    facts = sample()
    facts.platform, facts.machine = "linux", "x86_64"
    facts.open_errno, facts.caps, facts.ioctls = None, None, None
    facts.hv = None
    facts.complete = True
    facts.decoded = ["kvm: the engine said so"]
    facts.smoke = full.smoke  # a failed guest, with the MSRs it set
    msrs = dict(full.smoke.msrs)
    if block != "failure":
        facts.open_errno = errno.EACCES  # a Linux failure: still not macOS's
    if block == "guest":
        facts.smoke = passed_guest()
        facts.smoke.msrs = msrs  # another block's fact: present
    elif block == "msrs":
        facts.smoke.msrs = {}
    elif block == "deep":
        facts.deep = None
    elif block == "complete":
        facts.complete = False
    elif block == "failure":
        facts.caps = {name: 1 for name in facts.engine_caps}  # all there: no failure
        facts.smoke.step, facts.smoke.error = b.STEP_DONE, 0
    assert facts.mac is False and (facts.failure is None) == (block == "failure")
    held = [key for key, holds in rules if holds(facts)]
    assert held == []
    # and the block does hold for the facts it needs: it is not dead
    if block == "failure":
        facts.open_errno = errno.ENOENT
    elif block == "caps":
        facts.caps = {name: 0 for name in facts.engine_caps}
    elif block == "guest":
        facts.smoke = full.smoke
    elif block == "msrs":
        facts.smoke.msrs = msrs
    elif block == "deep":
        facts.deep = full.deep
        facts.deep.outcome = b.BOOT_PANICKED
    elif block == "complete":
        facts.complete = True
    else:
        facts.platform, facts.machine = "darwin", "arm64"
        facts.sysctls = {"kern.hv_support": 0}
    assert any(holds(facts) for _, holds in rules)


@pytest.mark.parametrize("how", ["timed out", "emulated", "no proof"])
def test_a_guest_that_did_not_pass_is_always_asked_about(how):
    # The guest block is skipped for a guest that passed, so each way a
    # guest can fall short must still reach its rule through _diagnose.
    facts = b.Facts("linux", "x86_64", engine=None, evidence=b.Evidence(gather=False))
    smoke = facts.smoke = passed_guest()
    if how == "timed out":
        smoke.timed_out = True
    elif how == "emulated":
        smoke.speed = b.Speed(1500.0, 0.5, 1024)
    else:
        smoke.proof = 0
    error = b._diagnose(facts)
    assert error is not None, how
    assert error.cause in {key.split("/")[0] for key, _ in _block("guest")}, error.cause
    smoke.timed_out, smoke.speed, smoke.proof = False, None, b.PROOF_VALUE
    assert b._diagnose(facts) is None  # and once it passes, nothing


def _reads(code: object, seen: set[int]) -> set[str]:
    """Every attribute and global name a function's code reaches: its own,
    its nested functions', and those of the module's functions and of the
    Facts, Evidence and SmokeResult members it names (transitively)."""
    import types

    assert isinstance(code, types.CodeType)
    if id(code) in seen:
        return set()
    seen.add(id(code))
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _reads(const, seen)
    for name in list(names):
        targets = [getattr(b, name, None)]
        targets += [vars(cls).get(name) for cls in (b.Facts, b.Evidence, b.SmokeResult)]
        for target in targets:
            if isinstance(target, property):
                target = target.fget
            if isinstance(target, types.FunctionType) and target.__module__ == b.__name__:
                names |= _reads(target.__code__, seen)
    return names


def test_only_the_complete_block_reads_whether_every_stage_answered():
    # The block is skipped until every stage has answered (and never asked
    # stage by stage): a rule elsewhere that read Facts.complete could hold
    # in one way in and not in another.
    last = {key for key, _ in _block("complete")}
    for key, holds in b.RULES:
        reads = "complete" in _reads(holds.__code__, set())
        assert reads == (key in last), key


def staged_in_full(facts: b.Facts) -> b.BoxliteError | None:
    """The staged questions as the gate asks them, each asked of the whole
    table (none narrowed to the rules its new fact can change)."""
    partial = facts.copy()
    for name in b._STAGES:
        setattr(partial, name, None)
    partial.complete = False
    error = b._diagnose(partial)
    for name in b._STAGES:
        if error is not None:
            return error
        if getattr(facts, name) is not None:
            setattr(partial, name, getattr(facts, name))
            error = b._diagnose(partial)
    if error is None and facts.complete:
        partial.complete = True
        error = b._diagnose(partial)
    return error


def guests() -> dict[str, b.SmokeResult | None]:
    emulated, msr, timed_out = passed_guest(), passed_guest(), passed_guest()
    emulated.speed = b.Speed(1500.0, 0.5, 1024)
    msr.msrs = {"boot_msrs_set": 3, "boot_msr_refused": "STAR"}
    timed_out.timed_out = True
    # OS calls of the guest's that failed, whose rules come early in RULES
    # (before the capabilities'), though the guest's stage comes later
    no_fds, busy = passed_guest(), passed_guest()
    no_fds.step, no_fds.error = b.STEP_CREATE_VCPU, errno.EMFILE
    busy.step, busy.error = b.STEP_CREATE_VM, errno.EBUSY
    return {
        "out of descriptors": no_fds,
        "busy": busy,
        "none": None,
        "passed": passed_guest(),
        "failed": sample().smoke,
        "emulated": emulated,
        "msr refused": msr,
        "timed out": timed_out,
    }


def test_the_staged_questions_answer_as_every_question_in_full():
    # For facts that differ in every stage and in how far they got, the
    # staged questions as _diagnose_staged narrows them (the last one asks
    # only the rules that read Facts.complete) must name the same cause as
    # every question asked of every rule.
    import itertools

    answers = set()
    for opened, caps, ioctls, guest, deep, complete in itertools.product(
        (None, errno.EACCES),
        (None, {"IRQCHIP": 1, "SET_TSS_ADDR": 1}, {"IRQCHIP": 0}, {"IRQCHIP": -errno.EPERM}),
        (None, {}, {"KVM_CREATE_IRQCHIP": errno.EINVAL}),
        sorted(guests()),
        (False, True),
        (False, True),
    ):
        facts = sample()
        facts.hv, facts.sysctls, facts.message = None, {}, None
        facts.open_errno, facts.caps, facts.ioctls = opened, caps, ioctls
        facts.smoke, facts.complete = guests()[guest], complete
        if deep:
            facts.deep.outcome = b.BOOT_PANICKED
        else:
            facts.deep = None
        got, want = b._diagnose_staged(facts), staged_in_full(facts)
        assert (got and got.cause) == (want and want.cause), (opened, caps, ioctls, guest, deep)
        answers.add(want and want.cause)
    assert len(answers) >= 10, answers  # the combinations reach many causes, and none


#: The stage each block's rules may read (the failure block's: any).
BLOCK_STAGES = {
    None: set(),  # outside every block
    "macos": set(),
    "caps": {"caps"},
    "guest": {"smoke"},
    "msrs": {"smoke"},
    "deep": {"deep"},
    "complete": {"complete"},
}


def test_without_a_failure_each_rule_reads_its_own_stage_in_the_stages_order():
    # Where no OS call failed, _diagnose_staged asks one question of all
    # the facts.  That is the staged answer only when each rule that can
    # then hold reads its own stage alone, and RULES lists the stage-free
    # rules first and the others in the order the stages come.
    stages = {*b._STAGES, "complete"}
    block_of = {key: name for name in b._RULE_BLOCKS for key, _ in _block(name)}
    at: dict[str | None, list[int]] = {}
    for index, (key, holds) in enumerate(b.RULES):
        block = block_of.get(key)
        if block == "failure":
            continue
        assert stages & _reads(holds.__code__, set()) <= BLOCK_STAGES[block], key
        at.setdefault(block, []).append(index)
    free = at.pop(None) + at.pop("macos")
    order = ["caps", "guest", "msrs", "deep", "complete"]
    assert set(at) == set(order)
    assert max(free) < min(at["caps"])
    for earlier, later in zip(order, order[1:]):
        assert max(at[earlier]) < min(at[later]), (earlier, later)


def test_a_host_where_no_call_failed_is_asked_one_question(mocker):
    facts = b.Facts("linux", "x86_64", engine=None, evidence=b.Evidence(gather=False))
    facts.smoke, facts.complete = guests()["emulated"], True
    spy = mocker.spy(b, "_diagnose")
    assert b._diagnose_staged(facts).cause == "guest-emulated"
    assert spy.call_count == 1 and spy.call_args.args[0] is facts
    spy.reset_mock()
    facts.smoke = sample().smoke
    facts.smoke.step, facts.smoke.error = b.STEP_CREATE_VCPU, errno.EINVAL
    assert b._diagnose_staged(facts).cause == "kvm-step-failed"  # asked stage by stage
    assert spy.call_count == 2


def _question(partial: b.Facts) -> tuple[bool, ...]:
    stages = [getattr(partial, name) is not None for name in b._STAGES]
    return (*stages, partial.complete)


@pytest.mark.parametrize("deep", [False, True])
def test_the_gate_asking_as_it_goes_asks_what_the_report_asks(mocker, deep):
    # The gate asks after the capabilities, then after the guest and the
    # start-up ioctls (after=), then after the deep boot; the report asks
    # once at the end.  The questions must be the same ones, in order, each
    # asked once, or the gate could stop at a cause the report never names.
    facts = sample()
    facts.complete = True
    if not deep:
        facts.deep = None
    asked: list[tuple[bool, ...]] = []
    mocker.patch.object(b, "_diagnose", side_effect=lambda p: asked.append(_question(p)))
    assert b._diagnose_staged(facts) is None
    whole, asked[:] = list(asked), []
    early = facts.copy()
    early.ioctls = early.smoke = early.deep = None
    early.complete = False
    b._diagnose_staged(early)
    fast = facts.copy()
    fast.deep = None
    b._diagnose_staged(fast, after="caps")
    if deep:
        b._diagnose_staged(facts, after="smoke")
    assert asked == whole
    # from no stage to every stage the facts have (an OS call failed, so a
    # failure rule holds before Facts.complete would matter)
    assert whole[0] == (False,) * 5 and whole[-1] == (True, True, True, deep, False)
    assert len(set(whole)) == len(whole)


def test_a_cause_found_part_way_stops_both_ways_at_the_same_question(mocker):
    facts = sample()
    facts.complete, facts.deep = True, None
    cause = b.InternalError("found")
    for stop in range(4):  # Q0, Q1 (caps), Q2 (ioctls), Q3 (smoke)
        asked: list[tuple[bool, ...]] = []

        def answer(partial, stop=stop, asked=asked):
            asked.append(_question(partial))
            return cause if len(asked) == stop + 1 else None

        mocker.patch.object(b, "_diagnose", side_effect=answer)
        assert b._diagnose_staged(facts) is cause
        whole = list(asked)
        asked.clear()
        early = facts.copy()
        early.ioctls = early.smoke = None
        early.complete = False
        got = b._diagnose_staged(early)
        if got is None:
            got = b._diagnose_staged(facts, after="caps")
        assert got is cause and asked == whole


def test_one_cause_parsed_alone_is_the_registrys_own():
    whole = b._causes()
    b._reset_caches()
    for key, cause in whole.items():
        alone = b._cause(key)
        assert alone is not cause  # parsed again, from its block alone
        assert {n: getattr(alone, n) for n in b._Cause.__slots__} == {
            n: getattr(cause, n) for n in b._Cause.__slots__
        }, key
    with pytest.raises(KeyError):
        b._cause("no-such-cause")
    with pytest.raises(KeyError):
        b._cause("kvm-missing")  # a prefix of real keys is not a key


def test_evidence_takes_only_the_fields_it_has():
    assert b.Evidence(gather=False, euid=5, runtime="podman").runtime == "podman"
    with pytest.raises(TypeError, match="no field nonsense"):
        b.Evidence(gather=False, euid=5, nonsense=1)
    assert b.Evidence(gather=False).node is None  # unset and not gathered
