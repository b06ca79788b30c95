"""python -m ssd_jax.run: see `ssd_jax.cli.run` (this module is only its entry point)."""

import os
import sys

from ssd_jax.cli.run import main

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    sys.exit(main())
  except KeyboardInterrupt:  # main's ExitStack has stopped any speculator by now
    print("python -m ssd_jax.run: interrupted", file=sys.stderr)
    sys.exit(130)
