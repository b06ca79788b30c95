"""An OpenAI-compatible HTTP server on a continuous batch (`python -m ssd_jax.serve`): the only
package that imports the HTTP stack (FastAPI, uvicorn, prometheus_client)."""
