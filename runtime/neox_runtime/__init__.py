"""Everything that runs inside the pods: GPT-NeoX training with DeepSpeed and serving.

Importing this package imports nothing heavy; torch is only pulled in by the modules
that need it (model, parallel, train, serve, ...), never by `neox_runtime.api`, which
the torch-free operator shares.
"""
