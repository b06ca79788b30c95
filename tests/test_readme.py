"""The README's Python example runs as printed (in a fresh interpreter, as a new user would run
it: the CPU layout pinned before JAX starts, ssd's draft in a speculator process)."""

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"


def python_example() -> str:
  text = README.read_text()
  section = text[text.index("### Python") :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_example_is_the_public_api():
  """It imports from the one documented place."""
  code = python_example()
  assert "from ssd_jax import Engine, Sampling, SpecConfig, load_model" in code
  assert "ssd_jax.cpu_layout()" in code


@pytest.mark.slow
def test_the_readme_example_runs():
  proc = subprocess.run(
    [sys.executable, "-c", python_example()],
    capture_output=True,
    text=True,
    timeout=900,
    stdin=subprocess.DEVNULL,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  *text, speed = proc.stdout.strip().splitlines()
  assert "".join(text).strip() and float(speed) > 0
  assert "shares a core" not in proc.stderr  # the layout gave the speculator a core of its own
