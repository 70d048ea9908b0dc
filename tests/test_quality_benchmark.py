"""benchmarks/quality.py (profiles, flags, schema, report arithmetic) and benchmarks/compound_error.py."""

import json
import shutil
import sys

import torch
from tiny_models import DATA, REPO, needs_shared, save_tiny_model

sys.path.insert(0, str(REPO / "benchmarks"))
import quality  # noqa: E402


def test_bit_specs_become_run_quant_and_llm_compressor_flags():
    assert quality.bits_flags("2") == ["--wbits", "2"]
    assert quality.bits_flags("3g128") == ["--wbits", "3", "--group-size", "128"]
    assert quality.llmc_bits("4g128") == ["--bits", "4", "--group-size", "128"]


def test_every_study_names_known_variants_and_every_profile_is_complete():
    for name, st in quality.STUDIES.items():
        assert set(st["variants"]) <= set(quality.VARIANTS), name
    for name, p in quality.PROFILES.items():
        assert {"model", "calib", "seqlen", "nsamples", "evals", "eval_windows"} <= set(p), name
        assert p["calib"][0] == "file" or p["calib"][1] == "train", name
    smol = quality.PROFILES["smollm2-135m"]
    assert (smol["seqlen"], smol["nsamples"], list(smol["evals"])) == (2048, 128, ["wikitext2", "c4"])


def test_older_rows_are_read_in_the_new_schema_and_ratios_use_the_same_seeds():
    prof = quality.PROFILES["stories260K"]
    old = [{"variant": v, "bits": 2, "seed": s, "nsamples": 128, "ppl": p, "quant_seconds": 1.0}
           for v, s, p in (("gptq", 0, 14.0), ("gptq", 1, 16.0), ("boa", 0, 9.0), ("boa", 1, 11.0), ("boa", 2, 1.0))]
    rows = [quality.normalize(r, prof) for r in old]
    assert rows[0]["bits"] == "2" and rows[0]["ppl"] == {"tinystories": 14.0}
    summary = quality.summarize(rows[:4], ["tinystories"])
    boa = next(s for s in summary if s["variant"] == "boa")
    assert boa["tinystories"]["mean"] == 10.0 and boa["seeds"] == [0, 1]
    table = quality.markdown(summary, {"tinystories": 5.0}, ["tinystories"])
    assert "| 0.500 |" in table      # (10 - 5) / (15 - 5)
    # a variant measured on other seeds than the reference gets no ratio
    table = quality.markdown(quality.summarize(rows, ["tinystories"]), {"tinystories": 5.0}, ["tinystories"])
    assert "| – |" in table


def _options_differ(a, b) -> set:
    """The options (QuantConfig fields) in which two resolved configurations differ."""
    return {k for k in vars(b) if getattr(a, k) != getattr(b, k)}


def _state_differs(a, b) -> set:
    """The keys in which two configurations' saved states (what a resume compares) differ."""
    sa, sb = a.state_dict(), b.state_dict()
    return {k for k in sa.keys() | sb.keys() if sa.get(k) != sb.get(k)}


def test_variant_names_keep_the_solver_they_were_measured_with():
    """Variants run on top of the pre-issue-17 solver unless they spell the corrections out:
    "gptq"/"boa-default" stay the earlier defaults their rows measured; "gptq-turbo"/"boa-turbo-auto"
    are the defaults since ("boa-turbo": the corrections with the full grid search row by row;
    "boa-turbo-fast": 16 joint rows whatever the head size, which is the default on SmolLM2)."""
    from lowmem_boa.cli.quant import parse

    def qc(variant):
        return parse(["--model", "m", *quality.OLD_SOLVER, *quality.VARIANTS[variant]])[0]
    for v in ("gptq", "boa-default", "boa"):
        c = qc(v)
        assert (c.fp_targets, c.refine_scales, c.follow_grids, c.joint_rows, c.grid_coarse) == (False, 0, False, 1, 1), v
    assert (qc("gptq-fpt").fp_targets, qc("gptq-fpt").fp_alpha) == (True, 1.0)      # the alpha of its rows
    new, default = qc("boa-turbo-auto"), parse(["--model", "m"])[0]
    assert (qc("boa-turbo").joint_rows, qc("boa-turbo").grid_coarse) == (1, 1)
    gptq, gptq_default = qc("gptq-turbo"), parse(["--model", "m", "--method", "gptq"])[0]
    for k in ("fp_alpha", "refine_scales", "grid_coarse"):
        assert getattr(gptq, k) == getattr(gptq_default, k), k
    for k in ("fp_alpha", "refine_scales", "follow_grids", "joint_rows", "grid_coarse", "mlp_row_hessian"):
        assert getattr(new, k) == getattr(default, k), k
    assert new.fp_targets is True and default.fp_targets is None     # None: on for BoA (resolved by the run)
    # --mlp-row-group: 128 in every BoA row measured before 512 became the default; "-g512" is the default
    assert new.mlp_row_group == 128 and qc("boa-turbo-auto-cap-nbv").mlp_row_group == 128
    # act-order: off in every BoA row measured before it became the 2-bit default; "-g512-colrow" is the default
    assert (qc("boa-turbo-auto-cap-nbv-g512").act_order_col, qc("boa-turbo-auto-cap-nbv-g512").act_order_row) == \
        (False, False)
    assert (qc("boa-turbo-auto-cap-nbv-col").act_order_col, qc("boa-turbo-auto-cap-nbv-col").act_order_row) == \
        (True, False)
    assert qc("boa-turbo-auto-cap-nbv-search").act_order_col is None    # the search tries every order itself
    now = qc("boa-turbo-auto-cap-nbv-g512-colrow")
    assert now.block_v is False and default.block_v is None       # None: off at 2 bits (resolved by the run)
    assert default.act_order_col is None and default.act_order_row is None
    from lowmem_boa.pipeline import resolve_defaults
    resolve_defaults(now), resolve_defaults(default)
    differ = _options_differ(now, default)
    assert differ == set(), differ      # the 2-bit default BoA, option for option (once resolved)
    # the 2-bit A/Bs on today's default change one thing each (without MLP row Hessians their group is moot)
    rw, nomlp = qc("boa-turbo-auto-cap-nbv-g512-colrow-rw"), qc("boa-turbo-auto-cap-nbv-colrow-nomlprow")
    resolve_defaults(rw), resolve_defaults(nomlp)
    assert _options_differ(rw, default) == {"residual_weights"}
    assert _options_differ(nomlp, default) - {"mlp_row_group"} == {"mlp_row_hessian"} and not nomlp.mlp_row_hessian
    # at 3 bits: block_v on, act-order (column + row), MLP row groups of 512 ("boa-turbo-auto-cap-g512-colrow");
    # "boa-turbo-auto-cap-g512" (no act-order) was the 3-bit default before its A/B
    three, default3 = (parse(["--model", "m", *quality.OLD_SOLVER, *quality.VARIANTS["boa-turbo-auto-cap-g512-colrow"],
                              "--wbits", "3"])[0], parse(["--model", "m", "--wbits", "3"])[0])
    resolve_defaults(three), resolve_defaults(default3)
    differ = _options_differ(three, default3)
    assert differ == set(), differ
    assert (three.block_v, three.act_order_col, three.act_order_row) == (True, True, True)
    # the 3-bit group-size A/B with act-order changes that one thing
    g128 = parse(["--model", "m", *quality.OLD_SOLVER, *quality.VARIANTS["boa-turbo-auto-cap-colrow"], "--wbits", "3"])[0]
    resolve_defaults(g128)
    assert _options_differ(g128, default3) == {"mlp_row_group"} and g128.mlp_row_group == 128
    before = qc("boa-turbo-auto-cap-g512")
    assert (before.block_v, before.act_order_col, before.act_order_row, before.mlp_row_group) == (True, False, False, 512)
    # GPTQ: column act-order off in every row measured before it became the 2-bit (then 3-bit) default;
    # "gptq-turbo-col" is the default
    assert qc("gptq-turbo").act_order_col is False and qc("gptq").act_order_col is False
    col = qc("gptq-turbo-col")
    resolve_defaults(col), resolve_defaults(gptq_default)
    differ = _state_differs(col, gptq_default)
    assert differ == {"fp_max_shift"}, differ    # (no guard of the fp targets, as gptq-turbo's rows)
    # and at 3 bits (GPTQ's 3-bit default since its A/B at the reference recipe)
    col3 = parse(["--model", "m", *quality.OLD_SOLVER, *quality.VARIANTS["gptq-turbo-col"], "--wbits", "3"])[0]
    gptq3 = parse(["--model", "m", "--method", "gptq", "--wbits", "3"])[0]
    resolve_defaults(col3), resolve_defaults(gptq3)
    assert _state_differs(col3, gptq3) == {"fp_max_shift"}
    colrow = qc("boa-turbo-auto-cap-g512-colrow")
    assert (colrow.act_order_col, colrow.act_order_row, colrow.mlp_row_group) == (True, True, 512)
    # with groups of 128 (the paper matrix's 3g128 / 4g128 rows): act-order on at 3 bits (since the 3g128 A/B)
    # and at 4 (since the 4g128 A/B), and at 4 bits per channel (since its A/B): "boa-turbo-auto-cap-g512-colrow" /
    # "gptq-turbo-col" are the defaults at each (GPTQ less the guard, as above)
    for bits, boa_v, gptq_v in (("3g128", "boa-turbo-auto-cap-g512-colrow", "gptq-turbo-col"),
                                ("4g128", "boa-turbo-auto-cap-g512-colrow", "gptq-turbo-col"),
                                ("4", "boa-turbo-auto-cap-g512-colrow", "gptq-turbo-col")):
        flags = quality.bits_flags(bits)
        boa_g = parse(["--model", "m", *quality.OLD_SOLVER, *quality.VARIANTS[boa_v], *flags])[0]
        boa_d = parse(["--model", "m", *flags])[0]
        gptq_g = parse(["--model", "m", *quality.OLD_SOLVER, *quality.VARIANTS[gptq_v], *flags])[0]
        gptq_d = parse(["--model", "m", "--method", "gptq", *flags])[0]
        for c in (boa_g, boa_d, gptq_g, gptq_d):
            resolve_defaults(c)
        assert _options_differ(boa_g, boa_d) == set(), bits
        assert _state_differs(gptq_g, gptq_d) == {"fp_max_shift"}, bits
        assert (boa_d.group_size, boa_d.act_order_col, boa_d.act_order_row, boa_d.block_v) == \
            (128 if "g" in bits else None, True, True, True)
        assert gptq_d.act_order_col is True
        assert boa_d.mlp_row_hessian is (bits == "3g128")      # MLP row Hessians up to 3 bits
    assert set(quality.STUDIES["paper"]["variants"]) >= {"gptq-turbo-col", "boa-turbo-auto-cap-nbv-g512-colrow",
                                                         "boa-turbo-auto-cap-g512-colrow", "boa-turbo-auto-cap-g512"}


def test_two_studies_of_one_profile_keep_each_others_rows(tmp_path):
    # two studies started from the same (empty) results file, each saving its rows as they end
    profile = quality.PROFILES["stories260K"]
    path = tmp_path / "quality.json"
    row = (lambda v, s: {"variant": v, "bits": "2", "seed": s, "nsamples": 8, "ppl": {"tinystories": 1.0 + s}})
    a = {"runs": [], "profile": {"name": "stories260K"}, "commands": ["a"], "fp": {"tinystories": 1.0}}
    b = {"runs": [], "profile": {"name": "stories260K"}, "commands": ["b"]}
    a = quality.save_result(path, profile, a, row("gptq", 0))
    b = quality.save_result(path, profile, b, row("boa", 0))
    a = quality.save_result(path, profile, a, row("gptq", 1))
    a = quality.save_result(path, profile, a, row("gptq", 1))      # saved twice: kept once
    on_disk = json.loads(path.read_text())
    assert sorted((r["variant"], r["seed"]) for r in on_disk["runs"]) == [("boa", 0), ("gptq", 0), ("gptq", 1)]
    assert on_disk["commands"] == ["a", "b"] and on_disk["fp"] == {"tinystories": 1.0}
    assert a == on_disk


@needs_shared
def test_compound_error_is_zero_for_the_fp_model_and_grafted_blocks_come_from_the_donor(tmp_path):
    import compound_error
    from transformers import AutoModelForCausalLM
    fp = save_tiny_model("llama", tmp_path / "fp")
    noisy = tmp_path / "noisy"          # the fp model with block 1 perturbed
    model = AutoModelForCausalLM.from_pretrained(fp)
    with torch.no_grad():
        for p in model.model.layers[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(noisy)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(fp / f, noisy / f)
    out = tmp_path / "errors.json"
    compound_error.main(["--fp", str(fp), "--model", f"same={fp}", "--model", f"noisy={noisy}",
                         "--model", f"fp+noisy:1={fp}+{noisy}:1", "--model", f"noisy+fp:1={noisy}+{fp}:1",
                         "--text", "wikitext2", "--windows", "2", "--seqlen", "64", "--data-dir", DATA,
                         "--layers", "1", "--out", str(out)])
    res = json.loads(out.read_text())["models"]
    assert max(res["same"]["raw"] + res["same"]["normed"]) == 0 and abs(res["same"]["kl"]) < 1e-9
    assert res["noisy"]["normed"][1] == 0 < res["noisy"]["normed"][2] and res["noisy"]["kl"] > 0   # block 0 untouched
    assert res["fp+noisy:1"] == res["noisy"] and res["noisy+fp:1"] == res["same"]
    assert all(e == [0, 0] for e in res["same"]["layers"].values())
    assert all(0 < e[0] and 0 < e[1] for e in res["noisy"]["layers"].values())


def test_the_matrix_shows_every_cell_of_a_study_measured_or_not():
    rows = [{"variant": v, "bits": b, "seed": s, "nsamples": n, "ppl": {"a": p, "b": 2 * p}, "quant_seconds": 1.0}
            for v, b, s, n, p in (("gptq", "2", 0, 8, 10.0), ("gptq", "2", 1, 8, 14.0), ("boa", "3", 0, 8, 5.0),
                                  ("boa", "2", 0, 16, 99.0))]
    table = quality.matrix(quality.summarize(rows, ["a", "b"]), {"a": 1.0, "b": 2.0}, ["a", "b"],
                           ["gptq", "boa", "rtn"], ["2", "3"], 8)
    lines = table.splitlines()
    assert lines[0] == "fp: 1.000 / 2.000"
    assert "| gptq | 12.00 / 24.00 (seeds 0,1) | – |" in lines     # the mean of the seeds measured
    assert "| boa | – | 5.00 / 10.00 (seed 0) |" in lines            # the 16-window run is another protocol
    assert "| rtn | – | – |" in lines


@needs_shared
def test_llm_compressor_cells_it_cannot_do_are_named_before_any_work(tmp_path, monkeypatch, capsys):
    import pytest
    mdir = save_tiny_model("llama", tmp_path / "m")     # input widths 64 (q/k/v/o, gate/up) and 96 (down)
    assert quality.llmc_unsupported(mdir, "2") is None and quality.llmc_unsupported(mdir, "3g32") is None
    why = quality.llmc_unsupported(mdir, "3g64")
    assert "96" in why and "64 " not in why.split("widths")[1]
    assert "64, 96" in quality.llmc_unsupported(mdir, "4g128")
    # a study asking only for such a cell stops with the reason, before the virtualenv or any run
    monkeypatch.setitem(quality.PROFILES, "tiny", dict(quality.PROFILES["llama-wt2-9m"], model=lambda: mdir))
    monkeypatch.setattr(quality, "ensure_llmc_venv", lambda: pytest.fail("work started"))
    with pytest.raises(SystemExit):
        quality.main(["--profile", "tiny", "--study", "paper", "--variants", "llmc-gptq", "--bits", "3g64",
                      "--out", str(tmp_path / "q.json"), "--work", str(tmp_path / "w")])
    assert "not multiples of 64" in capsys.readouterr().err
    # the matrix marks it n/a; an unmeasured cell it can do stays "–"
    table = quality.matrix([], {}, ["a"], ["llmc-gptq"], ["2", "3g64"], 8, {("llmc-gptq", "3g64")})
    assert "| llmc-gptq | – | n/a |" in table.splitlines()
