import os
import sys

from ssd_jax.bench.cli import main

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    sys.exit(main())
  except KeyboardInterrupt:  # the engines' speculators are stopped as the interrupt unwinds
    print("python -m ssd_jax.bench: interrupted", file=sys.stderr)
    sys.exit(130)
