"""Safety built into the server: API keys, quotas, moderation hooks, audit log, watermarking."""
