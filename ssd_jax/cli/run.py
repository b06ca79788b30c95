"""python -m ssd_jax.run: decode with ar / sd / ssd and compare them side by side, or chat.

With no arguments: SmolLM2-135M-Instruct as target, the shipped distilled drafts, the bundled
prompts, all three modes, greedy; says what it will run, then prints the headline ratios
(ssd / sd, sd / ar), a table of tokens/s, acceptance and cache hit rate, and one sample
completion. `--chat` talks instead.
"""

from __future__ import annotations

import contextlib
import sys

from tqdm import tqdm

from ssd_jax.cli import arguments
from ssd_jax.harness import compare as compare_lib
from ssd_jax.harness.config import RunConfig
from ssd_jax.harness.engines import build_engines, layout_of
from ssd_jax.speculator import ChannelError
from ssd_jax.speculator.layout import Layout, apply_layout, set_cpu_devices

PROG = "python -m ssd_jax.run"


def main(argv: list[str] | None = None) -> int:
  parser = arguments.build_parser()
  args = parser.parse_args(argv)
  try:
    config = arguments.run_config(args)
    layout = layout_of(config)
  except ValueError as e:
    parser.error(str(e))
  layout = apply_layout(layout)  # pins this process before JAX starts
  set_cpu_devices(config.layout.target_devices, config.layout.draft_devices)
  if config.chat:
    from ssd_jax.cli.chat import main as chat_main  # noqa: PLC0415

    return chat_main(config, layout, parser)
  _say(compare_lib.describe(config, layout))
  with contextlib.ExitStack() as stack:  # stops a speculator process however the run ends
    try:
      engines = build_engines(config, layout, stack)
      work = compare_lib.workload(config, engines)
    except (ValueError, FileNotFoundError) as e:
      parser.error(str(e))
    try:
      result = _compare(config, engines, layout, work)
    except ChannelError as e:
      print(f"{PROG}: error: {e}", file=sys.stderr)
      return 1
  _report(result)
  return 0


def _say(text: str) -> None:
  print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _compare(config: RunConfig, engines, layout: Layout, work) -> compare_lib.Comparison:
  bar = tqdm(
    total=len(work.ids) * len(config.modes),
    desc="decoding",
    unit="prompt",
    disable=not config.output.progress,
    file=sys.stderr,
  )

  def progress(mode: str, n: int) -> None:
    bar.set_postfix_str(mode)
    bar.update(n)

  with bar:
    bar.set_postfix_str("warm-up (compiling)")
    result = compare_lib.compare(config, engines, layout, work, progress)
  return result


def _report(c: compare_lib.Comparison) -> None:
  print(compare_lib.format_table(c))
  if (line := compare_lib.speculator_line(c)) is not None:
    print(f"\n{line}")
  last = list(c.results)[-1]
  tokenizer = c.engines[last].target.tokenizer
  sample = tokenizer.decode(c.results[last].tokens[0]).strip()
  print(f"\nsample ({c.workload.names[0]}, {last}):\n{sample}")
  if c.config.output.json is not None:
    compare_lib.write_json(c, c.config.output.json)
    print(f"\nwrote {c.config.output.json}")
