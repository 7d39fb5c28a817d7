"""Token data: memory-mapped shards and the resumable sampler (`shards`), Ray preprocessing, `neox-data`."""
