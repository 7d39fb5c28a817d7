"""The OpenAI-compatible HTTP API (FastAPI)."""
