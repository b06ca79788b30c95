"""HF safetensors directories <-> (ModelConfig, params).

Reads `config.json` and single or sharded (`model.safetensors.index.json`) safetensors files
with `safetensors.numpy` (no torch), maps HF names to our stacked layout, and writes the inverse
(so the shipped draft can be loaded by other engines).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ssd_jax.config import ModelConfig, RopeScaling
from ssd_jax.models import borrowed

Params = dict[str, Any]

_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_REQUIRED = (
  "model_type",
  "vocab_size",
  "hidden_size",
  "num_hidden_layers",
  "num_attention_heads",
  "intermediate_size",
)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """ModelConfig from an HF `config.json` dict (transformers 4.x and 5.x spellings)."""
  if not isinstance(hf, dict):
    raise ValueError(f"config.json must hold a JSON object, got {type(hf).__name__}")
  missing = [k for k in _REQUIRED if k not in hf]
  if missing:
    raise ValueError(
      f"config.json lacks {', '.join(missing)}: an HF config needs {', '.join(_REQUIRED)}"
    )
  model_type = hf.get("model_type")
  if model_type not in _FAMILIES:
    raise ValueError(
      f"unsupported model_type {model_type!r} in config.json; supported: {sorted(_FAMILIES)}"
    )
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") == "llama3" else None)
  if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
    raise ValueError(f"unsupported rope scaling {scaling!r}; only llama3 scaling is implemented")
  rope_scaling = None
  if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
    rope_scaling = RopeScaling(
      factor=float(scaling["factor"]),
      low_freq_factor=float(scaling["low_freq_factor"]),
      high_freq_factor=float(scaling["high_freq_factor"]),
      original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )
  heads = hf["num_attention_heads"]
  eos = hf.get("eos_token_id")
  eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
  family = _FAMILIES[model_type]
  return ModelConfig(
    family=family,
    vocab_size=hf["vocab_size"],
    hidden_size=hf["hidden_size"],
    num_layers=hf["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
    intermediate_size=hf["intermediate_size"],
    rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
    rope_scaling=rope_scaling,
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
    qk_norm=family == "qwen3",
    max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
    bos_token_id=hf.get("bos_token_id"),
    eos_token_ids=eos,
  )


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """An HF `config.json` dict that transformers loads as the same architecture."""
  arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
  hf = {
    "architectures": [arch[config.family]],
    "model_type": config.family,
    "vocab_size": config.vocab_size,
    "hidden_size": config.hidden_size,
    "num_hidden_layers": config.num_layers,
    "num_attention_heads": config.num_heads,
    "num_key_value_heads": config.num_kv_heads,
    "head_dim": config.head_dim,
    "intermediate_size": config.intermediate_size,
    "hidden_act": "silu",
    "rms_norm_eps": config.rms_norm_eps,
    "rope_theta": config.rope_theta,
    "tie_word_embeddings": config.tie_embeddings,
    "attention_bias": config.qkv_bias,
    "max_position_embeddings": config.max_position_embeddings,
    "bos_token_id": config.bos_token_id,
    "eos_token_id": list(config.eos_token_ids)
    if len(config.eos_token_ids) > 1
    else (config.eos_token_ids[0] if config.eos_token_ids else None),
    "torch_dtype": dtype,
  }
  if config.rope_scaling is not None:
    s = config.rope_scaling
    hf["rope_scaling"] = {
      "rope_type": "llama3",
      "factor": s.factor,
      "low_freq_factor": s.low_freq_factor,
      "high_freq_factor": s.high_freq_factor,
      "original_max_position_embeddings": s.original_max_position_embeddings,
    }
  return hf


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
  index = directory / "model.safetensors.index.json"
  if index.exists():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  else:
    files = sorted(p.name for p in directory.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {directory}")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    path = directory / name
    try:
      tensors |= load_file(path)
    except (SafetensorError, OSError) as e:
      raise ValueError(f"cannot read {path}: {e}; the file is missing or corrupt") from e
  return tensors


def params_from_hf_tensors(config: ModelConfig, tensors: dict[str, np.ndarray]) -> Params:
  """Map HF tensor names ([out, in] matrices) to our stacked params ([in, ...out] matrices)."""
  D, N, K, H = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  prefix = "model."

  def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
      raise ValueError(f"weights lack tensor {name!r} required by the config ({config.family})")
    x = tensors[name]
    if x.shape != shape:
      raise ValueError(f"tensor {name!r} has shape {x.shape}, config implies {shape}")
    return x

  def layer(i: int) -> dict[str, np.ndarray]:
    p = f"{prefix}layers.{i}."
    F = config.intermediate_size
    out = {
      "attn_norm": take(p + "input_layernorm.weight", (D,)),
      "wq": take(p + "self_attn.q_proj.weight", (N * H, D)).T.reshape(D, N, H),
      "wk": take(p + "self_attn.k_proj.weight", (K * H, D)).T.reshape(D, K, H),
      "wv": take(p + "self_attn.v_proj.weight", (K * H, D)).T.reshape(D, K, H),
      "wo": take(p + "self_attn.o_proj.weight", (D, N * H)).T.reshape(N, H, D),
      "mlp_norm": take(p + "post_attention_layernorm.weight", (D,)),
      "w_gate": take(p + "mlp.gate_proj.weight", (F, D)).T,
      "w_up": take(p + "mlp.up_proj.weight", (F, D)).T,
      "w_down": take(p + "mlp.down_proj.weight", (D, F)).T,
    }
    if config.qkv_bias:
      out["bq"] = take(p + "self_attn.q_proj.bias", (N * H,)).reshape(N, H)
      out["bk"] = take(p + "self_attn.k_proj.bias", (K * H,)).reshape(K, H)
      out["bv"] = take(p + "self_attn.v_proj.bias", (K * H,)).reshape(K, H)
    if config.qk_norm:
      out["q_norm"] = take(p + "self_attn.q_norm.weight", (H,))
      out["k_norm"] = take(p + "self_attn.k_norm.weight", (H,))
    if p + "self_attn.o_proj.bias" in tensors:
      raise ValueError("attention output bias (o_proj.bias) is not supported")
    return out

  per_layer = [layer(i) for i in range(config.num_layers)]
  stacked = {k: np.stack([lp[k] for lp in per_layer]) for k in per_layer[0]}
  params = {
    "embed": take(prefix + "embed_tokens.weight", (config.vocab_size, D)),
    "layers": stacked,
    "final_norm": take(prefix + "norm.weight", (D,)),
  }
  if not config.tie_embeddings:
    params["lm_head"] = take("lm_head.weight", (config.vocab_size, D)).T
  # Transposed views become contiguous arrays (device_put would copy them anyway).
  return jax.tree.map(np.ascontiguousarray, params)


def params_to_hf_tensors(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
  """Inverse of `params_from_hf_tensors`."""
  D, N, K, H = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  lp = {k: np.asarray(v) for k, v in params["layers"].items()}
  out = {
    "model.embed_tokens.weight": np.asarray(params["embed"]),
    "model.norm.weight": np.asarray(params["final_norm"]),
  }
  if not config.tie_embeddings:
    out["lm_head.weight"] = np.asarray(params["lm_head"]).T
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    out |= {
      p + "input_layernorm.weight": lp["attn_norm"][i],
      p + "self_attn.q_proj.weight": lp["wq"][i].reshape(D, N * H).T,
      p + "self_attn.k_proj.weight": lp["wk"][i].reshape(D, K * H).T,
      p + "self_attn.v_proj.weight": lp["wv"][i].reshape(D, K * H).T,
      p + "self_attn.o_proj.weight": lp["wo"][i].reshape(N * H, D).T,
      p + "post_attention_layernorm.weight": lp["mlp_norm"][i],
      p + "mlp.gate_proj.weight": lp["w_gate"][i].T,
      p + "mlp.up_proj.weight": lp["w_up"][i].T,
      p + "mlp.down_proj.weight": lp["w_down"][i].T,
    }
    if config.qkv_bias:
      out |= {
        p + "self_attn.q_proj.bias": lp["bq"][i].reshape(N * H),
        p + "self_attn.k_proj.bias": lp["bk"][i].reshape(K * H),
        p + "self_attn.v_proj.bias": lp["bv"][i].reshape(K * H),
      }
    if config.qk_norm:
      out |= {
        p + "self_attn.q_norm.weight": lp["q_norm"][i],
        p + "self_attn.k_norm.weight": lp["k_norm"][i],
      }
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def load_hf(
  directory: str | os.PathLike, base_embedding: Callable[[str], np.ndarray] | None = None
) -> tuple[ModelConfig, Params]:
  """Load an HF safetensors model directory (config.json + *.safetensors).

  A draft that borrows its token embedding (`ssd_jax.models.borrowed`) names its base model in
  config.json; `base_embedding(name)` returns that model's [V, D_base] embedding table.
  """
  directory = Path(directory)
  config_path = directory / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{directory} has no config.json; is it an HF model directory?")
  try:
    hf = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path} is not valid JSON: {e}") from e
  try:
    config = config_from_hf(hf)
  except (KeyError, TypeError) as e:  # e.g. rope scaling without its fields
    raise ValueError(f"{config_path}: malformed field ({type(e).__name__}: {e})") from e
  except ValueError as e:
    raise ValueError(f"{config_path}: {e}") from e
  tensors = _read_tensors(directory)
  if borrowed.BASE_KEY in hf:
    tensors = _borrow_embedding(hf[borrowed.BASE_KEY], tensors, base_embedding, config_path)
  return config, params_from_hf_tensors(config, tensors)


def _borrow_embedding(base: str, tensors, base_embedding, config_path: Path):
  if base_embedding is None:
    raise ValueError(
      f"{config_path} borrows its token embedding from {base!r}: load it with "
      "ssd_jax.models.registry.load_model, which finds the base model's embedding"
    )
  missing = [name for name in borrowed.TENSORS if name not in tensors]
  if missing:
    raise ValueError(f"{config_path.parent} lacks {', '.join(missing)} (borrowed embedding)")
  parts = [tensors.pop(name) for name in borrowed.TENSORS]
  embed = borrowed.materialize(np.asarray(base_embedding(base)), *parts)
  return tensors | {"model.embed_tokens.weight": embed}


def save_hf(
  directory: str | os.PathLike,
  config: ModelConfig,
  params: Params,
  extra_files: dict[str, str] | None = None,
  borrowed_embedding: tuple[str, dict[str, np.ndarray]] | None = None,
) -> Path:
  """Write config.json + model.safetensors (+ extra text files such as tokenizer.json).

  `borrowed_embedding` = (base model, {name: tensor} for `borrowed.TENSORS`) writes those
  tensors in place of the embedding table, and names the base in config.json.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  dtype = np.asarray(jax.tree.leaves(params)[0]).dtype.name
  hf = config_to_hf(config, dtype)
  tensors = params_to_hf_tensors(config, params)
  if borrowed_embedding is not None:
    base, parts = borrowed_embedding
    hf[borrowed.BASE_KEY] = base
    del tensors["model.embed_tokens.weight"]
    tensors |= {name: np.ascontiguousarray(parts[name]) for name in borrowed.TENSORS}
  (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
  for name, text in (extra_files or {}).items():
    (directory / name).write_text(text)
  return directory
