"""The draft side of speculative decoding, wherever it runs: the `Speculator` contract
(`base.py`), a speculator on a mesh of this process (`local.py`), one in a process of its own or
on another host (`process.py` starts it, `remote.py` talks to it, `worker.py` is its side,
`channel.py` carries the messages), and the CPU layout that gives it a core (`layout.py`).
`python -m ssd_jax.speculator` is the process itself.
"""

from __future__ import annotations

import jax

from ssd_jax.models.registry import LoadedModel
from ssd_jax.models.transformer import Params
from ssd_jax.speculator.base import Drafter, Placement, Site, Speculator, SpeculatorStats
from ssd_jax.speculator.channel import ChannelError
from ssd_jax.speculator.layout import Layout, cpu_layout, resolve_placement
from ssd_jax.speculator.local import LocalSite, head_size
from ssd_jax.speculator.process import ProcessSite, options_for

__all__ = [
  "ChannelError",
  "Drafter",
  "Layout",
  "LocalSite",
  "Placement",
  "ProcessSite",
  "Site",
  "Speculator",
  "SpeculatorStats",
  "cpu_layout",
  "open_site",
]


def open_site(
  placement: Placement,
  *,
  draft: LoadedModel,
  draft_vocab,
  params: Params,
  mesh: jax.sharding.Mesh,
  attention_impl: str,
  device: jax.Device,
) -> Site:
  """Where ssd's draft side runs for `placement`: `params` on `mesh` in this process, or a
  speculator process loading the same draft, head and attention impl (`device`: this process's
  end of the array pipe). Nothing starts until the first run asks for a speculator."""
  if resolve_placement(placement, device.platform) == "device":
    return LocalSite(params, mesh)
  options = options_for(draft, draft_vocab, attention_impl, placement)
  return ProcessSite(options, device, head_size(params, draft.config))
