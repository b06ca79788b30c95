"""HF transformers side by side: `generate` (eager, autoregressive) and assisted generation with
the same models, prompts, precision (f32), greedy decoding and CPU threads as ssd_jax.

Optional: needs torch and transformers (`make hf`); never imported by `make run` / `make test`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ssd_jax.harness import runs as harness
from ssd_jax.models.registry import LoadedModel, smollm2_dir
from ssd_jax.models.weights import save_hf


def _torch():
  try:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
  except ImportError as e:
    raise ValueError("--hf needs torch and transformers: run `make hf` first") from e
  return torch, transformers


def _hf_dir(model: LoadedModel, tmp: Path) -> Path:
  """An HF directory for `model` (the converted target is one already)."""
  if model.name == "smollm2-135m":
    return smollm2_dir()
  return save_hf(tmp / model.name, model.config, model.params)


def _time_generate(model, ids: list[list[int]], max_new: int, **kwargs):
  torch, _ = _torch()
  outputs, seconds, tokens = [], 0.0, 0
  for prompt in ids:
    x = torch.tensor([prompt])
    t = time.perf_counter()
    with torch.no_grad():
      y = model.generate(x, max_new_tokens=max_new, do_sample=False, **kwargs)
    seconds += time.perf_counter() - t
    new = y[0, len(prompt) :].tolist()
    outputs.append(new)
    tokens += len(new)
  return outputs, tokens / seconds


def compare(
  target: LoadedModel,
  draft: LoadedModel,
  texts: list[str],
  max_new: int,
  runs: list[dict],
  prompt_set: str,
) -> dict:
  torch, transformers = _torch()
  torch.set_num_threads(2)
  ids = harness.encode(target.tokenizer, texts, chat=True)
  with tempfile.TemporaryDirectory() as tmp:
    load = lambda m: transformers.AutoModelForCausalLM.from_pretrained(
      _hf_dir(m, Path(tmp)), dtype=torch.float32
    ).eval()
    hf_target, hf_draft = load(target), load(draft)
    eos = target.config.eos_token_ids[0]
    hf_target.generation_config.pad_token_id = eos
    _time_generate(hf_target, ids[:1], 8)  # warm-up
    ar_tokens, ar = _time_generate(hf_target, ids, max_new)
    _, assisted = _time_generate(hf_target, ids, max_new, assistant_model=hf_draft)
  ours = {
    r["mode"]: r
    for r in runs
    if r["prompt_set"] == prompt_set and r["batch_size"] == 1 and r["temperature"] == 0
  }
  best = lambda mode: max(
    (
      r["tokens_per_second"]
      for r in runs
      if r["mode"] == mode
      and r["prompt_set"] == prompt_set
      and r["batch_size"] == 1
      and r["temperature"] == 0
    ),
    default=np.nan,
  )
  return {
    "hf_ar_tokens_per_second": ar,
    "hf_assisted_tokens_per_second": assisted,
    "ssd_jax_ar_over_hf_ar": best("ar") / ar,
    "ssd_over_hf_assisted": best("ssd") / assisted,
    "sd_over_hf_assisted": best("sd") / assisted,
    "hf_ar_tokens": ar_tokens[:2],
    "modes_compared": sorted(ours),
  }


def model_speed(prompt: list[int], decode_tokens: int) -> list[dict]:
  """HF eager prefill and decode tokens/s of the converted SmolLM2, f32 and bf16."""
  torch, transformers = _torch()
  torch.set_num_threads(2)
  rows = []
  for dtype in (torch.float32, torch.bfloat16):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=dtype).eval()
    x = torch.tensor([prompt])
    with torch.no_grad():
      model(x)
      t = time.perf_counter()
      model(x)
      prefill = len(prompt) / (time.perf_counter() - t)
    _, decode = _time_generate(
      model, [prompt], decode_tokens, pad_token_id=model.config.eos_token_id
    )
    rows.append(
      {
        "engine": "hf-eager",
        "dtype": str(dtype).split(".")[-1],
        "prefill_tokens_per_second": prefill,
        "decode_tokens_per_second": decode,
      }
    )
    print(rows[-1], flush=True)
  return rows
