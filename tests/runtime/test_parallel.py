"""Tensor parallel 2 and pipeline parallel 2 give the logits / loss of one rank (gloo, real processes)."""

import pytest
import torch

from runtime_helpers import spawn_ranks
from neox_runtime.api.architecture import ModelArchitecture
from neox_runtime.model import GPTNeoXForCausalLM, causal_lm_loss

ARCH = ModelArchitecture(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=64, rotary_pct=0.5, max_position_embeddings=32)


def _reference(arch, seed=0):
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(arch)
    ids = torch.randint(0, arch.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    return model, ids


def _tp_worker(rank, world, arch_json):
    from neox_runtime.parallel import sharding
    from neox_runtime.parallel.tensor import TensorSlice, apply_tensor_parallel, gather_state_dict, loss_function

    arch = ModelArchitecture.model_validate_json(arch_json)
    model, ids = _reference(arch)
    full_state = {k: v.clone() for k, v in model.state_dict().items()}
    logits = model(ids)
    loss = causal_lm_loss(logits[:, :-1], ids[:, 1:])
    loss.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    tp = TensorSlice(rank=rank, size=world)  # the default group: the whole world
    apply_tensor_parallel(model, tp)
    qkv = model.gpt_neox.layers[0].attention.query_key_value.weight
    assert qkv.shape == (3 * arch.hidden_size // world, arch.hidden_size)
    assert model.gpt_neox.embed_in.weight.shape == (arch.vocab_size // world, arch.hidden_size)
    assert (model.embed_out.weight is model.gpt_neox.embed_in.weight) == arch.tie_word_embeddings
    local_logits = model(ids)  # this rank's vocabulary rows only: (B, T, V / tp)
    vocab = tp.vocab_range(arch.vocab_size)
    assert (local_logits - logits[..., vocab]).abs().max().item() <= 1e-5
    tp_loss = loss_function(tp, arch.vocab_size)(local_logits[:, :-1], ids[:, 1:])
    assert abs(tp_loss.item() - loss.item()) <= 1e-6
    tp_loss.backward()
    # every rank's gradient is its slice of the full gradient: sharded matrices, vocab rows
    # (the tied head's contribution included) and the replicated LayerNorms alike
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, sharding.shard(name, full_grads[name], rank, world), atol=1e-6, rtol=1e-4)
    gathered = gather_state_dict(model, tp)
    assert all(torch.equal(gathered[k], full_state[k]) for k in full_state)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_tensor_parallel_2_matches_one_rank(tie):
    spawn_ranks(_tp_worker, 2, ARCH.model_copy(update=dict(tie_word_embeddings=tie)).model_dump_json())


def _pp_worker(rank, world, arch_json):
    import deepspeed

    from neox_runtime.api.layout import ParallelLayout
    from neox_runtime.parallel.parallelize import parallelize
    from neox_runtime.parallel.startup import FullStateDict

    deepspeed.init_distributed(dist_backend="gloo")  # adopts the existing process group
    arch = ModelArchitecture.model_validate_json(arch_json)
    model, ids = _reference(arch)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    batch = torch.randint(0, arch.vocab_size, (4, 17), generator=torch.Generator().manual_seed(2))
    x, y = batch[:, :-1], batch[:, 1:]
    ref_opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_losses = []
    for _ in range(2):
        loss = causal_lm_loss(model(x), y)
        ref_losses.append(loss.item())
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()

    with torch.device("meta"):
        plain = GPTNeoXForCausalLM(arch)
    pipe = parallelize(plain, ParallelLayout(world_size=world, pipeline=world), rank=rank,
                       source=FullStateDict(full), device=torch.device("cpu")).module
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
              "gradient_clipping": 0.0,
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=pipe, config=config,
                                      optimizer=torch.optim.SGD(pipe.parameters(), lr=0.5))
    micro = [(x[:2], y[:2]), (x[2:], y[2:])]
    losses = [engine.train_batch(iter(micro)).item() for _ in range(2)]
    # DeepSpeed reports the loss on the last stage and broadcasts it
    assert abs(losses[0] - ref_losses[0]) <= 1e-5, (losses, ref_losses)
    assert abs(losses[1] - ref_losses[1]) <= 1e-5, (losses, ref_losses)  # gradients flowed through both stages


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_pipeline_parallel_2_matches_one_rank(tie):
    spawn_ranks(_pp_worker, 2, ARCH.model_copy(update=dict(tie_word_embeddings=tie)).model_dump_json())


CLIP, LR = 0.01, 100.0  # clipping always scales; a step the size of the weights (fp32 resolves it)


def _clip_worker(rank, world, arch_json, precision, zero_stage):
    import deepspeed

    from neox_runtime.api.layout import ParallelLayout
    from neox_runtime.parallel import sharding
    from neox_runtime.parallel.parallelize import parallelize
    from neox_runtime.parallel.startup import FullStateDict

    deepspeed.init_distributed(dist_backend="gloo")
    arch = ModelArchitecture.model_validate_json(arch_json)
    model, _ = _reference(arch)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    batch = torch.randint(0, arch.vocab_size, (4, 17), generator=torch.Generator().manual_seed(3))
    x, y = batch[:, :-1], batch[:, 1:]
    causal_lm_loss(model(x), y).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}  # a tied embedding once
    norm = torch.stack([g.norm() for g in grads.values()]).norm().item()
    coef = min(1.0, CLIP / (norm + 1e-6))

    with torch.device("meta"):
        plain = GPTNeoXForCausalLM(arch)
    layout = ParallelLayout(world_size=world, tensor=2, pipeline=2)
    parallel = parallelize(plain, layout, rank=rank, source=FullStateDict(full), device=torch.device("cpu"))
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
              "gradient_clipping": CLIP, "zero_optimization": {"stage": zero_stage}, "steps_per_print": 10**9,
              "bf16": {"enabled": precision == "bf16"}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=parallel.module, config=config,
                                      optimizer=torch.optim.SGD(parallel.module.parameters(), lr=LR))
    engine.train_batch(iter([(x[:2], y[:2]), (x[2:], y[2:])]))
    if engine.get_global_grad_norm() is not None:  # ZeRO and the bf16 optimizer report the norm they clipped by
        assert abs(engine.get_global_grad_norm() - norm) <= (2e-2 if precision == "bf16" else 1e-5) * norm
    if precision == "fp32":  # the update is the single-rank SGD step scaled by the single-rank clip factor
        for name, p in parallel.hf_parameters:
            before = sharding.shard(name, full[name], layout.coordinates(rank).model, 2)
            expected = -LR * coef * sharding.shard(name, grads[name], layout.coordinates(rank).model, 2)
            torch.testing.assert_close(p.detach() - before, expected, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("precision,zero_stage,tie", [("fp32", 0, False), ("fp32", 1, True), ("bf16", 1, False)])
def test_tp2_pp2_gradient_clipping_counts_each_parameter_once(precision, zero_stage, tie):
    """DeepSpeed's clip norm over 2 tensor ranks x 2 stages equals one rank's (fp32 clip_grad_norm_, ZeRO, bf16)."""
    spawn_ranks(_clip_worker, 4, ARCH.model_copy(update=dict(tie_word_embeddings=tie)).model_dump_json(),
                precision, zero_stage)
