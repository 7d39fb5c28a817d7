"""What the operator and the runtime share, and nothing that needs torch.

- `architecture`: model shapes and named presets,
- `training` / `serving`: the NeoXTraining / NeoXServing spec models (the CRD is
  generated from them),
- `contract`: env var names and mount paths between operator and pods,
- `names`: deterministic child names.
"""
