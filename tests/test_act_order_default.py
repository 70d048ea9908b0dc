"""Act-order (--act-order-col / --act-order-row) as BoA's default, and column act-order as GPTQ's, at 2-4 bits,
per channel and with groups (static groups): where it applies,
what the user is told, and how a run started before the change resumes. (The solver's act-order paths
against the slow reference: test_fast_vs_reference.py; their exports: test_export.py.)"""

import json

import pytest

from lowmem_boa.checkpoint.state import MANIFEST, STATE_DIR, RunState, StateError, config_key
from lowmem_boa.cli.quant import parse
from lowmem_boa.config import CHANGED_DEFAULTS, QuantConfig, RunOptions
from lowmem_boa.pipeline import prepare_run, resolve_defaults
from tiny_models import SHARED, needs_shared


@pytest.mark.parametrize("kw, col, row", [
    (dict(method="boa"), True, True),
    (dict(method="boa", wbits=3), True, True),                  # measured at 2 and 3 bits
    (dict(method="boa", wbits=4), True, True),                  # measured at 4 bits per channel (seeds 0-1)
    (dict(method="boa", wbits=8), False, False),                # above 4 bits: unmeasured
    (dict(method="boa", group_size=64), True, True),            # static groups: measured at 3g128
    (dict(method="boa", wbits=3, group_size=128), True, True),
    (dict(method="boa", wbits=4, group_size=128), True, True),    # measured at 4g128 (seeds 0-1)
    (dict(method="boa", wbits=8, group_size=128), False, False),  # above 4 bits: unmeasured
    (dict(method="boa", kquant="q2_k"), False, False),          # k-quants fix the column blocks
    (dict(method="boa", search_orders=True), False, False),     # the search tries every order itself
    (dict(method="gptq"), True, False),                         # GPTQ has no row order
    (dict(method="gptq", wbits=3), True, False),                # measured at 2 and 3 bits
    (dict(method="gptq", wbits=4), True, False),
    (dict(method="gptq", wbits=8), False, False),
    (dict(method="gptq", group_size=128), True, False),
    (dict(method="gptq", wbits=3, group_size=128), True, False),
    (dict(method="gptq", wbits=4, group_size=128), True, False),
    (dict(method="gptq", wbits=8, group_size=128), False, False),
    (dict(method="gptq", kquant="q4_k"), False, False),
    (dict(method="gptq", search_orders=True), False, False),
    (dict(method="rtn"), False, False),
])
def test_default_rule(kw, col, row):
    qc = QuantConfig(model="m", **kw)
    assert qc.act_order_col is None and qc.act_order_row is None
    resolve_defaults(qc)
    assert (qc.act_order_col, qc.act_order_row) == (col, row), kw
    qc.validate()     # (with --kquant: the resolved default never clashes with the k-quant's column blocks)


def test_flags_override_the_default_one_by_one():
    def resolved(*argv):
        qc = parse(["--model", "m", *argv])[0]
        resolve_defaults(qc)
        return qc.act_order_col, qc.act_order_row
    assert resolved() == (True, True)
    assert resolved("--no-act-order-col") == (False, True)
    assert resolved("--no-act-order-row") == (True, False)
    assert resolved("--no-act-order-col", "--no-act-order-row") == (False, False)
    assert resolved("--method", "gptq") == (True, False)
    assert resolved("--method", "gptq", "--no-act-order-col") == (False, False)
    assert resolved("--wbits", "3") == (True, True)
    assert resolved("--wbits", "4") == (True, True)
    assert resolved("--wbits", "4", "--no-act-order-row") == (True, False)
    assert resolved("--wbits", "8") == (False, False)
    assert resolved("--wbits", "8", "--act-order-col", "--act-order-row") == (True, True)
    assert resolved("--method", "gptq", "--wbits", "3") == (True, False)
    assert resolved("--method", "gptq", "--wbits", "4") == (True, False)
    assert resolved("--method", "gptq", "--wbits", "8") == (False, False)
    assert resolved("--wbits", "3", "--group-size", "128") == (True, True)
    assert resolved("--wbits", "3", "--group-size", "128", "--no-act-order-col") == (False, True)
    assert resolved("--method", "gptq", "--wbits", "3", "--group-size", "128") == (True, False)
    assert resolved("--wbits", "4", "--group-size", "128") == (True, True)
    assert resolved("--wbits", "4", "--group-size", "128", "--no-act-order-col", "--no-act-order-row") == (False, False)
    assert resolved("--method", "gptq", "--wbits", "4", "--group-size", "128") == (True, False)
    assert resolved("--wbits", "8", "--group-size", "128") == (False, False)
    with pytest.raises(ValueError, match="--act-order-col"):
        QuantConfig(model="m", kquant="q2_k", act_order_col=True).validate()


def test_the_note_names_the_rule_that_applies():
    for kw, rule in ((dict(wbits=4), "act-order up to 4 bits"),
                     (dict(wbits=8), "act-order up to 4 bits"),
                     (dict(wbits=4, group_size=128), "act-order up to 4 bits"),
                     (dict(method="gptq", wbits=8, group_size=128), "act-order up to 4 bits")):
        notes = [n for n in resolve_defaults(QuantConfig(model="m", **kw)) if "act-order up to" in n]
        assert len(notes) == 1 and rule in notes[0], (kw, notes)


@needs_shared
def test_plan_resolves_and_says_so():
    model = str(SHARED / "models" / "stories260K")
    for kw, on in ((dict(method="boa"), True), (dict(method="boa", wbits=3), True), (dict(method="boa", wbits=4), True),
                   (dict(method="boa", wbits=8), False), (dict(method="gptq"), True),
                   (dict(method="gptq", wbits=3), True), (dict(method="gptq", wbits=4), True),
                   (dict(method="gptq", wbits=8), False),
                   (dict(method="rtn"), None)):
        qc = QuantConfig(model=model, **kw)
        notes = prepare_run(qc, RunOptions(device="cpu", plan_only=True, progress=False)).notes
        said = [n for n in notes if "act-order" in n]
        if on is None:      # RTN: no order, no note
            assert qc.act_order_col is False and not said, notes
        else:
            assert qc.act_order_col is on and qc.act_order_row is (on and kw["method"] == "boa")
            rows = kw["method"] == "boa"     # GPTQ: a note on the columns only
            assert len(said) == 1 + rows and all(("by decreasing" in n) is on for n in said), said


def test_the_changed_defaults_are_the_act_orders_and_were_off():
    assert CHANGED_DEFAULTS["act_order_col"][0] is False and CHANGED_DEFAULTS["act_order_row"][0] is False


@pytest.mark.parametrize("method, wbits, group", [
    ("boa", 2, None), ("boa", 3, None),              # BoA per channel: both orders
    ("gptq", 2, None), ("gptq", 3, None),            # GPTQ per channel: its columns only
    ("boa", 4, None), ("gptq", 4, None),             # ... and at 4 bits (since the 4-bit A/B)
    ("boa", 2, 128), ("boa", 3, 128), ("gptq", 3, 128),   # with groups (act-order since the 3g128 A/B)
    ("boa", 4, 128), ("gptq", 4, 128),                        # ... and at 4 bits (since the 4g128 A/B)
])
def test_a_run_started_before_the_change_is_refused_with_the_flags_that_resume_it(tmp_path, method, wbits, group):
    boa = method == "boa"
    grouped = {} if group is None else {"group_size": group}
    old = QuantConfig(model="m", method=method, wbits=wbits, act_order_col=False,       # the key such a run has
                      act_order_row=False if boa else None, **grouped)
    new = QuantConfig(model="m", method=method, wbits=wbits, **grouped)
    resolve_defaults(old), resolve_defaults(new)
    state = tmp_path / "out" / STATE_DIR
    state.mkdir(parents=True)
    (state / MANIFEST).write_text(json.dumps({"key": config_key(old.state_dict()), "config": old.state_dict()}))
    message = ("differs in: act_order_col, act_order_row; the default of --act-order-col changed .* pass "
               "--no-act-order-col to resume it; the default of --act-order-row changed .* pass --no-act-order-row "
               r"to resume it\)" if boa else
               r"differs in: act_order_col; the default of --act-order-col changed .* pass --no-act-order-col to "
               r"resume it\)")
    with pytest.raises(StateError, match=message):
        RunState.check_output(tmp_path / "out", new.state_dict(), overwrite=False)
    flags = ["--no-act-order-col", "--no-act-order-row"] if boa else ["--no-act-order-col"]
    argv = ["--model", "m", "--method", method, "--wbits", str(wbits), *flags]
    resumed = parse(argv + ([] if group is None else ["--group-size", str(group)]))[0]
    resolve_defaults(resumed)
    assert RunState.check_output(tmp_path / "out", resumed.state_dict(), overwrite=False) == "resume"


def test_configurations_the_change_does_not_touch_keep_their_key():
    for kw in (dict(method="gptq", wbits=8), dict(method="gptq", wbits=8, group_size=128), dict(method="rtn"),
               dict(method="rtn", group_size=128), dict(method="boa", wbits=8),
               dict(method="boa", wbits=8, group_size=128)):
        a, b = QuantConfig(model="m", **kw), QuantConfig(model="m", act_order_col=False, act_order_row=False, **kw)
        resolve_defaults(a), resolve_defaults(b)
        assert a.state_dict() == b.state_dict(), kw

