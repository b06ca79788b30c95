"""The command line of `python -m ssd_jax.run`: its flags (`arguments`), the run (`run`) and the
chat (`chat`)."""
