"""Size of the real low-bit exports of finished runs, against float16 of the same weights.

    python benchmarks/export_sizes.py RUN_DIR [RUN_DIR ...] [--json OUT]

For each run (``run_quant.py --output RUN_DIR``) writes the packed, GPTQ and compressed-tensors
exports into a temporary directory and reports, per format, the bytes of the quantized linear
layers' tensors (codes + scales + zeros (+ g_idx), biases excluded) over the float16 bytes of those
weights (ideal: bits/16 plus the grids), and the total size of the safetensors files next to the
float16 size of the whole model (the embeddings and norms stay unquantized).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lowmem_boa.export.formats import FORMATS, export_run  # noqa: E402

QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".weight_packed", ".weight_scale",
                  ".weight_zero_point", ".weight_shape", ".qcodes", ".qscale", ".qzero")


def tensor_bytes(model_dir: Path) -> dict[str, int]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_slice(k)
                n = 1
                for s in t.get_shape():
                    n *= s
                out[k] = n * {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "U8": 1, "I8": 1}[t.get_dtype()]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
        report = json.loads((run / "quant_report.json").read_text())
        qc = report["config"]
        fake = tensor_bytes(run)     # the fake-quantized float32 checkpoint
        modules = {k[:-len(".weight")] for k in fake if k.endswith(".weight") and ".layers." in k
                   and any(p in k for p in ("_proj.", "fc1.", "fc2.", "out_proj."))}
        fp16_linear = sum(fake[m + ".weight"] // 4 * 2 for m in modules)
        fp16_total = sum(v // 4 * 2 if v % 4 == 0 else v for v in fake.values())
        with tempfile.TemporaryDirectory() as tmp:
            for fmt in FORMATS:
                out = Path(tmp) / fmt
                export_run(run, fmt, out)
                sizes = tensor_bytes(out)
                qbytes = sum(v for k, v in sizes.items() if any(k.startswith(m + ".") for m in modules)
                             and k.endswith(QUANT_SUFFIXES))
                files = sum(f.stat().st_size for f in out.glob("*.safetensors"))
                row = {"run": run.name, "bits": qc["wbits"], "group_size": qc["group_size"], "format": fmt,
                       "linear_bytes": qbytes, "fp16_linear_bytes": fp16_linear,
                       "linear_ratio": qbytes / fp16_linear, "file_bytes": files, "fp16_model_bytes": fp16_total}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| run | bits | format | quantized linears / fp16 | ideal bits/16 | safetensors (MiB) | fp16 model (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['bits']} | {r['format']} | {r['linear_ratio']:.4f} | {r['bits'] / 16:.4f} | "
              f"{r['file_bytes'] / 2 ** 20:.2f} | {r['fp16_model_bytes'] / 2 ** 20:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
