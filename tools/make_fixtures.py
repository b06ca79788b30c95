"""Generate the HF-parity test fixtures with torch + transformers (not needed by CI).

  pip install torch==2.13.0 transformers accelerate gguf   # a separate venv is fine
  python tools/make_fixtures.py --gguf PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

Writes tests/fixtures/hf/<name>/{config.json,model.safetensors,expected.npz} for tiny random
Llama-3 (RoPE scaling), Qwen3 (head_dim != hidden / heads) and Qwen2 (qkv bias) models with GQA
ratio 3, tied and untied heads, and tests/fixtures/smollm2_parity.npz with the real model's
top-32 logits on a fixed chat prompt plus the HF tokenizer's ids for a few strings.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
COMMON = dict(
  vocab_size=96,
  hidden_size=48,
  intermediate_size=80,
  num_hidden_layers=2,
  num_attention_heads=6,
  num_key_value_heads=2,
  max_position_embeddings=256,
  rms_norm_eps=1e-6,
  bos_token_id=1,
  eos_token_id=2,
)
TEXTS = [
  "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
  "Hello, world! 12345 numbers and  spaces\ttabs\nnewlines — unicode ✓",
  "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def tiny_models():
  llama = transformers.LlamaConfig(
    **COMMON,
    head_dim=8,
    tie_word_embeddings=False,
    rope_theta=5000.0,
    rope_scaling={
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 32,
    },
  )
  qwen3 = transformers.Qwen3Config(**COMMON, head_dim=12, tie_word_embeddings=True, rope_theta=1e6)
  qwen2 = transformers.Qwen2Config(**COMMON, tie_word_embeddings=False, rope_theta=1e4)
  return {
    "llama3": (transformers.LlamaForCausalLM, llama),
    "qwen3": (transformers.Qwen3ForCausalLM, qwen3),
    "qwen2": (transformers.Qwen2ForCausalLM, qwen2),
  }


def randomize(model: torch.nn.Module, seed: int) -> None:
  """HF inits norms to 1 and biases to 0; make every tensor matter for the parity check."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.3 * noise)


def make_tiny(out: Path) -> None:
  for i, (name, (cls, config)) in enumerate(tiny_models().items()):
    torch.manual_seed(i)
    model = cls(config).eval()
    randomize(model, seed=100 + i)
    directory = out / "hf" / name
    shutil.rmtree(directory, ignore_errors=True)
    model.save_pretrained(directory, safe_serialization=True)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(i))
    with torch.no_grad():
      logits = model(ids).logits.float().numpy()
    np.savez(directory / "expected.npz", input_ids=ids.numpy().astype(np.int32), logits=logits)
    print(f"{name}: {sum(p.numel() for p in model.parameters())} params -> {directory}")


def make_smollm2(out: Path, gguf: Path) -> None:
  directory, name = str(gguf.parent), gguf.name
  tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(
    directory, gguf_file=name, dtype=torch.float32
  ).eval()
  prompt = tok.apply_chat_template(
    [{"role": "user", "content": "Write a Python function that reverses a linked list."}],
    tokenize=False,
    add_generation_prompt=True,
  )
  ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
  with torch.no_grad():
    logits = model(ids).logits[0].float().numpy()
  top = np.argsort(-logits, axis=-1)[:, :32]
  text_ids = [np.array(tok(t, add_special_tokens=False).input_ids, np.int32) for t in TEXTS]
  np.savez(
    out / "smollm2_parity.npz",
    prompt=np.array(prompt),
    input_ids=ids[0].numpy(),
    top_ids=top.astype(np.int32),
    top_logits=np.take_along_axis(logits, top, axis=-1).astype(np.float32),
    texts=np.array(TEXTS),
    **{f"text_ids_{i}": t for i, t in enumerate(text_ids)},
  )
  print(f"smollm2: {ids.shape[1]} prompt tokens -> {out / 'smollm2_parity.npz'}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf")
  parser.add_argument("--out", type=Path, default=ROOT)
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  make_tiny(args.out)
  if args.gguf:
    make_smollm2(args.out, args.gguf)


if __name__ == "__main__":
  main()
