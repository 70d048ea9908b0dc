"""The presets in configs/*.yaml: each parses into a valid configuration; the paper's BoA preset is the
configuration of the benchmark's ``boa`` rows; a bad preset is refused before any work."""

from pathlib import Path

import pytest

from lowmem_boa.cli.quant import parse

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_preset_parses_and_validates(preset):
    qc, ro = parse(["--model", "m", "--config", str(REPO / "configs" / preset)])
    qc.validate()


def test_boa_paper_preset_is_the_benchmarks_paper_boa(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import quality
    preset, _ = parse(["--model", "m", "--config", str(REPO / "configs" / "boa-paper.yaml")])
    rows, _ = parse(["--model", "m", *quality.OLD_SOLVER, *quality.VARIANTS["boa"]])
    assert preset.state_dict() == rows.state_dict()
    assert preset.block_v and not preset.mlp_row_hessian and not preset.fp_targets and preset.joint_rows == 1
    # a flag on the command line overrides the preset
    assert parse(["--model", "m", "--config", str(REPO / "configs" / "boa-paper.yaml"),
                  "--no-block-v"])[0].block_v is False


def test_a_preset_with_an_unknown_key_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("block_v: true\nwbits: 3\n")
    with pytest.raises(SystemExit):
        parse(["--model", "m", "--config", str(bad)])
    assert "unknown keys wbits" in capsys.readouterr().err
