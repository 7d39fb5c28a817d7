"""Parallelism applied to a built model from outside: `parallelize` (the entry point), `tensor`, `pipeline`,
`sharding` (the split table), `startup` (sharded materialisation), and the DeepSpeed JSON."""
