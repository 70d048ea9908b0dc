"""benchmarks/quality.py: the one quality benchmark's profiles, flags, schema and report arithmetic."""

import sys

from tiny_models import REPO

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


def test_variant_names_keep_the_solver_they_were_measured_with():
    """Variants run on top of the pre-issue-17 solver unless they spell the corrections out:
    "gptq"/"boa-default" stay the earlier defaults their rows measured; "gptq-turbo"/"boa-turbo"
    are the defaults since."""
    from lowmem_boa.cli.quant import parse

    def qc(variant):
        return parse(["--model", "m", *quality.OLD_SOLVER, *quality.VARIANTS[variant]])[0]
    for v in ("gptq", "boa-default", "boa"):
        c = qc(v)
        assert (c.fp_targets, c.refine_scales, c.follow_grids) == (False, 0, False), v
    assert (qc("gptq-fpt").fp_targets, qc("gptq-fpt").fp_alpha) == (True, 1.0)      # the alpha of its rows
    new, default = qc("boa-turbo"), parse(["--model", "m"])[0]
    for k in ("fp_alpha", "refine_scales", "follow_grids", "joint_rows", "grid_coarse", "mlp_row_hessian"):
        assert getattr(new, k) == getattr(default, k), k
    assert new.fp_targets is True and default.fp_targets is None     # None: on for BoA (resolved by the run)
