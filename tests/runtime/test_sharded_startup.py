"""Sharded start-up: each rank allocates only its stage and tensor slice, the same values in every layout.

The counts are held against the planner's `parameters_on_rank`, the values against the
full `init_parameter` tensors cut by `sharding.shard`, on real gloo ranks that build the
real runtime modules (DeepSpeed's PipelineModule included).
"""

import resource

import pytest
import torch

from runtime_helpers import spawn_ranks
from neox_runtime.api.architecture import ModelArchitecture
from neox_runtime.api.layout import ParallelLayout, parameters_on_rank
from neox_runtime.model import GPTNeoXForCausalLM, parameter_init
from neox_runtime.parallel import sharding, startup
from neox_runtime.parallel.startup import init_parameter, init_slice

ARCH = ModelArchitecture(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=64, rotary_pct=0.5, max_position_embeddings=32)
SEED = 7


def test_seeded_init_gives_every_slice_the_values_of_the_full_tensor(monkeypatch):
    monkeypatch.setattr(startup, "CHUNK_ELEMENTS", 100)  # many row chunks, so slices cross chunk borders
    h = ARCH.hidden_size
    for name, shape in [("gpt_neox.layers.1.attention.query_key_value.weight", (3 * h, h)),
                        ("gpt_neox.layers.1.attention.query_key_value.bias", (3 * h,)),
                        ("gpt_neox.layers.1.mlp.dense_4h_to_h.weight", (h, ARCH.intermediate_size)),
                        ("gpt_neox.embed_in.weight", (ARCH.vocab_size, h))]:
        full = init_parameter(name, shape, ARCH, SEED)
        assert full.shape == shape and torch.equal(full, init_parameter(name, shape, ARCH, SEED))
        for world in (2, 4):
            for rank in range(world):
                index = sharding.shard_slices(name, shape, rank, world)
                assert torch.equal(init_slice(name, shape, ARCH, SEED, index), full[index]), (name, world, rank)
    embed = init_parameter("gpt_neox.embed_in.weight", (64, h), ARCH, SEED)
    assert not torch.equal(embed, init_parameter("gpt_neox.embed_in.weight", (64, h), ARCH, SEED + 1))
    assert not torch.equal(embed, init_parameter("embed_out.weight", (64, h), ARCH, SEED))


def test_seeded_init_keeps_the_gpt_neox_distribution():
    big = ARCH.model_copy(update=dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024))
    for name, shape in [("gpt_neox.layers.0.attention.query_key_value.weight", (768, 256)),
                        ("gpt_neox.layers.0.mlp.dense_4h_to_h.weight", (256, 1024))]:
        mean, std = parameter_init(name, big)
        value = init_parameter(name, shape, big, SEED)
        assert abs(value.mean().item()) < 0.05 * std and abs(value.std().item() / std - 1) < 0.02, name
    assert parameter_init("gpt_neox.layers.0.mlp.dense_4h_to_h.weight", big)[1] == 0.02 / (2 * 4) ** 0.5  # wang init
    assert torch.equal(init_parameter("gpt_neox.layers.0.input_layernorm.weight", (256,), big, SEED), torch.ones(256))
    assert torch.equal(init_parameter("gpt_neox.layers.0.mlp.dense_h_to_4h.bias", (1024,), big, SEED),
                       torch.zeros(1024))


def _hf_names_of_stage(arch, layout, stage):
    """HF names a stage must hold: its blocks, the embedding first, the final norm and the head last."""
    with torch.device("meta"):
        names = [n for n, _ in GPTNeoXForCausalLM(arch).named_parameters()]
    blocks = layout.stage_layers(arch.num_hidden_layers)[stage]
    out = {n for n in names if n.startswith("gpt_neox.layers.") and int(n.split(".")[2]) in blocks}
    if stage == 0:
        out.add("gpt_neox.embed_in.weight")
    if stage == layout.pipeline - 1:
        out |= {"gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"}
        out.add("gpt_neox.embed_in.weight" if arch.tie_word_embeddings else "embed_out.weight")
    return out


def _allocation_worker(rank, world, tensor, pipeline, arch_json):
    import deepspeed

    from neox_runtime.parallel.parallelize import parallelize
    from neox_runtime.parallel.pipeline import hf_name
    from neox_runtime.parallel.startup import SeededInit

    deepspeed.init_distributed(dist_backend="gloo")
    arch = ModelArchitecture.model_validate_json(arch_json)
    layout = ParallelLayout(world_size=world, tensor=tensor, pipeline=pipeline)
    coords = layout.coordinates(rank)
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(arch)
    parallel = parallelize(model, layout, rank=rank, source=SeededInit(arch, SEED), device=torch.device("cpu"))
    trained = dict(parallel.module.named_parameters())  # what DeepSpeed will optimise, each once
    assert not any(p.is_meta for p in trained.values())
    assert sum(p.numel() for p in trained.values()) == parameters_on_rank(arch, layout, coords)
    by_id = {id(p): name for name, p in parallel.hf_parameters}
    assert len(by_id) == len(parallel.hf_parameters) and set(by_id) == {id(p) for p in trained.values()}
    assert set(by_id.values()) == _hf_names_of_stage(arch, layout, coords.pipe)
    for name, p in parallel.hf_parameters:  # exactly this rank's slice of the layout-free init
        full = init_parameter(name, sharding.full_shape(name, p.shape, tensor), arch, SEED)
        assert torch.equal(p.detach(), sharding.shard(name, full, coords.model, tensor)), name
    for module_name, p in trained.items():  # DeepSpeed's names map onto the HF names (checkpoints rely on it)
        if pipeline == 1:
            assert module_name == "model." + by_id[id(p)]
        elif module_name.startswith("tied_modules."):
            assert by_id[id(p)] == "gpt_neox.embed_in.weight"
        else:
            layer, rest = module_name.split(".", 1)
            assert hf_name(int(layer), rest, arch.num_hidden_layers) == by_id[id(p)], module_name


@pytest.mark.slow
@pytest.mark.parametrize("world,tensor,pipeline,tie", [
    (4, 2, 2, False), (4, 2, 2, True), (3, 1, 3, True), (4, 2, 1, True), (4, 4, 1, False),
])
def test_every_rank_allocates_what_the_planner_counts_and_its_slice_of_the_init(world, tensor, pipeline, tie):
    arch = ARCH.model_copy(update=dict(tie_word_embeddings=tie))
    spawn_ranks(_allocation_worker, world, tensor, pipeline, arch.model_dump_json())


def _init_from_worker(rank, world, path):
    import deepspeed

    from neox_runtime.checkpoint.hf import read_architecture, read_state_dict
    from neox_runtime.parallel.parallelize import parallelize
    from neox_runtime.parallel.startup import HFSlices

    deepspeed.init_distributed(dist_backend="gloo")
    arch = read_architecture(path)
    layout = ParallelLayout(world_size=world, tensor=2, pipeline=2)
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(arch)
    parallel = parallelize(model, layout, rank=rank, source=HFSlices(path), device=torch.device("cpu"))
    full = read_state_dict(path)
    for name, p in parallel.hf_parameters:
        assert torch.equal(p.detach(), sharding.shard(name, full[name].float(), layout.coordinates(rank).model, 2))


@pytest.mark.slow
def test_init_from_gives_each_rank_its_slices_of_a_sharded_hf_directory(tmp_path):
    from neox_runtime.checkpoint.hf import save_hf_model

    torch.manual_seed(0)
    save_hf_model(GPTNeoXForCausalLM(ARCH), ARCH, tmp_path, max_shard_bytes=20_000, dtype=torch.bfloat16)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    spawn_ranks(_init_from_worker, 4, str(tmp_path))


def test_slices_are_read_from_every_weight_layout_and_bad_files_are_named(tmp_path):
    from neox_runtime.checkpoint.hf import read_state_dict, read_state_dict_slices, save_hf_model

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(ARCH)
    save_hf_model(model, ARCH, tmp_path / "st", max_shard_bytes=20_000)
    (tmp_path / "bin").mkdir()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    names = ["gpt_neox.embed_in.weight", "gpt_neox.layers.3.attention.dense.weight", "embed_out.weight"]
    full = read_state_dict(tmp_path / "st")
    for path in (tmp_path / "st", tmp_path / "bin"):
        wanted = {n: sharding.shard_slices(n, full[n].shape, 1, 2) for n in names}
        got = read_state_dict_slices(path, wanted)
        assert all(torch.equal(got[n], sharding.shard(n, full[n], 1, 2)) for n in names), path
        with pytest.raises(ValueError, match="no tensor gpt_neox.layers.9"):
            read_state_dict_slices(path, {"gpt_neox.layers.9.attention.dense.weight": (slice(None),) * 2})
        with pytest.raises(ValueError, match=r"embed_out.weight has shape \(64, 32\), the architecture needs"):
            read_state_dict_slices(path, {"embed_out.weight": (slice(None),) * 2}, shapes={"embed_out.weight": (96, 32)})


def _memory_worker(rank, world, arch_json, results):
    import deepspeed

    from neox_runtime.parallel.parallelize import parallelize
    from neox_runtime.parallel.startup import SeededInit

    deepspeed.init_distributed(dist_backend="gloo")
    arch = ModelArchitecture.model_validate_json(arch_json)
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(arch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the high-water mark so far
    layout = ParallelLayout(world_size=world, tensor=2, pipeline=2)
    parallelize(model, layout, rank=rank, source=SeededInit(arch, SEED), device=torch.device("cpu"))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    results.put((rank, grown * 1024, 4 * parameters_on_rank(arch, layout, layout.coordinates(rank))))


@pytest.mark.slow
def test_start_up_peak_memory_of_a_rank_is_its_shard_not_the_model():
    import torch.multiprocessing as mp

    # ~60M parameters (240 MB in fp32); each of the 4 ranks holds about a quarter of them
    arch = ModelArchitecture(vocab_size=32768, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                             intermediate_size=2048, rotary_pct=0.25)
    full_bytes = 4 * arch.num_parameters()
    results = mp.get_context("spawn").SimpleQueue()
    spawn_ranks(_memory_worker, 4, arch.model_dump_json(), results)
    for rank, grown, shard_bytes in sorted(results.get() for _ in range(4)):
        # the rank's shard plus at most a drawing chunk and allocator slack; building the
        # full model first (as start-up used to) would grow by at least full_bytes
        assert grown < shard_bytes + 0.15 * full_bytes, (rank, grown / 2**20, shard_bytes / 2**20, full_bytes / 2**20)
        assert grown < 0.45 * full_bytes, (rank, grown / 2**20, full_bytes / 2**20)
