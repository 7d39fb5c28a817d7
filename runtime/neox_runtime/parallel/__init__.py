"""Parallelism applied to a built model from outside: tensor (`tensor`), pipeline (`pipeline`), DeepSpeed JSON."""
