"""OpenAI-compatible serving of GPT-NeoX models: api -> engine -> workers -> model.

`api` turns HTTP requests into engine requests, `engine` batches them continuously
over a preallocated KV cache (schedule -> execute -> update), `engine.tp` runs one
worker process per tensor-parallel rank, and the model's own parameters do the math.
"""
