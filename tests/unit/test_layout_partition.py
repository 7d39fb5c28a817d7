"""How a layout splits a model: pipeline stages and the parameters each rank holds (torch-free).

The runtime's allocation is held against `parameters_on_rank` in
tests/runtime/test_sharded_startup.py; here the arithmetic itself.
"""

import pytest

from neox_runtime.api.architecture import ModelArchitecture, preset
from neox_runtime.api.layout import ParallelLayout, parameters_on_rank


@pytest.mark.parametrize("layers,stages,sizes", [
    (44, 4, [11, 11, 11, 11]), (6, 4, [2, 2, 1, 1]), (5, 5, [1] * 5), (7, 1, [7]), (9, 2, [5, 4]),
])
def test_stages_cover_every_block_once_and_evenly(layers, stages, sizes):
    parts = ParallelLayout(world_size=stages, pipeline=stages).stage_layers(layers)
    assert [len(r) for r in parts] == sizes
    assert [i for r in parts for i in r] == list(range(layers))


def test_more_stages_than_layers_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="pipeline_parallel"):
        ParallelLayout(world_size=4, pipeline=4).stage_layers(3)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("tensor,pipeline", [(1, 1), (2, 1), (1, 2), (2, 2), (2, 4), (4, 3)])
def test_one_replica_holds_the_model_once_plus_what_is_replicated(tensor, pipeline, tie):
    arch = ModelArchitecture(vocab_size=96, hidden_size=48, num_hidden_layers=7, num_attention_heads=4,
                             intermediate_size=96, rotary_pct=0.25, tie_word_embeddings=tie)
    layout = ParallelLayout(world_size=tensor * pipeline * 2, tensor=tensor, pipeline=pipeline)
    replica = [layout.coordinates(r) for r in range(layout.world_size) if layout.coordinates(r).data == 0]
    held = sum(parameters_on_rank(arch, layout, c) for c in replica)
    tied_copy = arch.vocab_size * arch.hidden_size if tie and pipeline > 1 else 0
    # every tensor rank holds the LayerNorms and the row-parallel biases whole (6 h a block), and the final norm
    replicated = (tensor - 1) * (6 * arch.hidden_size * arch.num_hidden_layers + 2 * arch.hidden_size)
    assert held == arch.num_parameters() + tied_copy + replicated


def test_neox_20b_recipe_rank_holds_an_eighth_or_so():
    arch = preset("neox-20b").architecture
    layout = ParallelLayout(world_size=96, tensor=2, pipeline=4)
    counts = [parameters_on_rank(arch, layout, layout.coordinates(r)) for r in (0, 95)]
    # 11 blocks split two ways plus half of the 50432 x 6144 embedding (first) or head (last)
    assert all(2.5e9 < n < 2.8e9 for n in counts), counts
    assert counts[0] - counts[1] == -2 * arch.hidden_size  # the last stage also holds the final norm
