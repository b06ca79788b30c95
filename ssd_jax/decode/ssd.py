"""Speculative speculative decoding (placeholder until the engine lands)."""


def run_ssd(run, tstate, dstate):
  raise NotImplementedError("ssd mode is not implemented yet")
