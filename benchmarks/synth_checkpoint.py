"""Write a synthetic Hugging Face checkpoint of any config: random weights at a realistic scale.

    python benchmarks/synth_checkpoint.py --config configs/llama-2-7b.json --out /tmp/llama7b-synth
    python benchmarks/synth_checkpoint.py --config configs/opt-125m.json --blocks 2 --out /tmp/opt-synth

For memory and time measurements at real model sizes on machines that cannot download the real
model. **Random weights test memory and time, never quality**: every number measured on such a
checkpoint says so.

What is written, as the hub lays a model out: ``config.json`` (the given config, ``--blocks``
hidden layers), sharded ``model-0000k-of-0000n.safetensors`` of at most ``--shard-size`` with
``model.safetensors.index.json`` (``metadata.total_size`` + ``weight_map``), a
``generation_config.json`` and a tokenizer copied from ``--tokenizer`` (its ids must be below the
config's vocabulary, which is checked). Weights: linears and embeddings normal with the config's
``initializer_range`` (0.02 for Llama/OPT, the scale of trained 7B weights), biases 0, norm weights 1;
every tensor from its own seed, so the file content is reproducible. One shard is held in memory at
a time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def _value(name: str, shape: tuple, dtype: torch.dtype, std: float, seed: int) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:                        # norm weights (RMSNorm / LayerNorm)
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=g) * std).to(dtype)


def write_synthetic(config_path: Path, out: Path, blocks: int | None = None, dtype: str = "float16",
                    shard_size: int = 2 * 10 ** 9, tokenizer: Path | None = None, seed: int = 0) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from lowmem_boa.scheduler import build_skeleton
    raw = json.loads(Path(config_path).read_text())
    if blocks is not None:
        raw["num_hidden_layers"] = blocks
    raw["dtype"] = dtype
    raw.pop("torch_dtype", None)
    config = AutoConfig.for_model(**raw)
    tdtype = getattr(torch, dtype)
    model = build_skeleton(config, tdtype)
    std = float(getattr(config, "initializer_range", 0.02))
    params = dict(model.named_parameters(remove_duplicate=True))   # a tied LM head is stored once, as on the hub
    names = [n for n in model.state_dict() if n in params]          # state-dict order
    if getattr(config, "tie_word_embeddings", False):
        head = next(n for n, p in model.named_parameters(remove_duplicate=False)
                    if p is model.get_output_embeddings().weight)
        names = [n for n in names if n != head]
    out.mkdir(parents=True, exist_ok=True)
    shards, current, size, total = [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            tmp = out / f"shard-{len(shards):05d}.tmp"
            save_file(current, str(tmp), metadata={"format": "pt"})
            shards.append((tmp, list(current)))
            current, size = {}, 0

    for n in names:
        p = params[n]
        nbytes = p.numel() * torch.empty((), dtype=tdtype).element_size()
        if current and size + nbytes > shard_size:
            flush()
        current[n] = _value(n, tuple(p.shape), tdtype, std, seed)
        size += nbytes
        total += nbytes
    flush()
    k = len(shards)
    weight_map = {}
    for i, (tmp, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{k:05d}.safetensors"
        tmp.replace(out / final)
        (out / final).chmod(0o644)      # safetensors writes 0600
        weight_map.update({key: final for key in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    raw["architectures"] = raw.get("architectures") or [type(model).__name__]
    raw["synthetic"] = "random weights (benchmarks/synth_checkpoint.py): memory and time only, not quality"
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
    gen = {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer is not None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer)
        if len(tok) > config.vocab_size:
            raise SystemExit(f"tokenizer {tokenizer} has {len(tok)} tokens, more than the config's vocabulary "
                             f"{config.vocab_size}")
        for f in TOKENIZER_FILES:
            if (Path(tokenizer) / f).is_file():
                shutil.copyfile(Path(tokenizer) / f, out / f)
    return {"dir": str(out), "shards": k, "total_bytes": total, "tensors": len(weight_map),
            "largest_tensor_bytes": max(params[n].numel() for n in names) * torch.empty((), dtype=tdtype).element_size()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="a Hugging Face config.json (e.g. configs/llama-2-7b.json)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--blocks", type=int, default=None, help="number of transformer blocks (default: the config's)")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--shard-size", type=float, default=2e9, help="bytes per shard (default 2e9)")
    ap.add_argument("--tokenizer", type=Path, default=REPO.parent / "shared" / "models" / "llama-wt2-9m",
                    help="model directory whose tokenizer files are copied")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty")
    info = write_synthetic(args.config, args.out, args.blocks, args.dtype, int(args.shard_size), args.tokenizer,
                           args.seed)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
