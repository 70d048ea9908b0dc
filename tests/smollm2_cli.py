"""Shared by the SmolLM2 end-to-end tests (tests/test_smollm2*.py, one file per test so that
pytest-xdist's ``--dist loadfile`` runs them on different workers): the CI-sized command line. The model itself is built once, under a lock, by ``tiny_models.smollm2_dir``."""

import subprocess
import sys

from tiny_models import DATA, REPO

BLOCKS = 30

# The product's defaults but MLP row Hessians in groups of 128 rows (the default before 512): these tests
# check loading, quality against RTN and resume, not the group size (docs/results.md measures it), and
# 512 costs ~45 s per block at one thread on these 512 calibration tokens against ~8 s (measured: the
# quality test took 1,375 s in CI with it, the critical path).
MLP_ROWS = ("--mlp-row-group", "128")


def quant_args(model, out, *extra):
    return ["--model", str(model), "--output", str(out), "--calib", "wikitext2", "--data-dir", DATA,
            "--device", "cpu", "--no-progress", "--method", "boa", "--wbits", "2", "--nsamples", "4",
            "--seqlen", "128", *MLP_ROWS, *extra]


def quant_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "run_quant.py"), *args], cwd=REPO, capture_output=True,
                          text=True)
