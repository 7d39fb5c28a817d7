"""Tensor parallel 2 and pipeline parallel 2 give the logits / loss of one rank (gloo, real processes)."""

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runtime_helpers import free_port
from neox_runtime.api.architecture import ModelArchitecture
from neox_runtime.model import GPTNeoXForCausalLM, causal_lm_loss

ARCH = ModelArchitecture(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=64, rotary_pct=0.5, max_position_embeddings=32)


def _spawn(fn, world: int, *args):
    port = free_port()
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=_entry, args=(fn, rank, world, port, errors, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    failures = [errors.get() for _ in range(world) if not errors.empty()]
    assert not failures, "\n".join(failures)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _entry(fn, rank, world, port, errors, *args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        fn(rank, world, *args)
        # No rank closes its gloo connections while a peer may still be in its last send or
        # receive: that peer's gloo thread would throw and abort the process (exit -6).
        dist.barrier()
    except Exception:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _reference(arch, seed=0):
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(arch)
    ids = torch.randint(0, arch.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    return model, ids


def _tp_worker(rank, world, arch_json):
    from neox_runtime.parallel.tensor import apply_tensor_parallel, gather_state_dict

    arch = ModelArchitecture.model_validate_json(arch_json)
    model, ids = _reference(arch)
    full_state = {k: v.clone() for k, v in model.state_dict().items()}
    logits = model(ids)
    causal_lm_loss(logits[:, :-1], ids[:, 1:]).backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    apply_tensor_parallel(model)
    qkv = model.gpt_neox.layers[0].attention.query_key_value.weight
    assert qkv.shape == (3 * arch.hidden_size // world, arch.hidden_size)
    tp_logits = model(ids)
    assert (tp_logits - logits).abs().max().item() <= 1e-5
    causal_lm_loss(tp_logits[:, :-1], ids[:, 1:]).backward()
    # replicated parameters get the full gradient on every rank (the input-grad all-reduce is what makes it so)
    emb = model.gpt_neox.embed_in.weight.grad
    torch.testing.assert_close(emb, full_grads["gpt_neox.embed_in.weight"], atol=1e-6, rtol=1e-4)
    gathered = gather_state_dict(model)
    assert all(torch.equal(gathered[k], full_state[k]) for k in full_state)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_tensor_parallel_2_matches_one_rank(tie):
    _spawn(_tp_worker, 2, ARCH.model_copy(update=dict(tie_word_embeddings=tie)).model_dump_json())


def _pp_worker(rank, world, arch_json):
    import deepspeed

    from neox_runtime.parallel.pipeline import load_from_full, pipeline_module

    deepspeed.init_distributed(dist_backend="gloo")  # adopts the existing process group
    arch = ModelArchitecture.model_validate_json(arch_json)
    model, ids = _reference(arch)
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

    torch.manual_seed(0)
    full = GPTNeoXForCausalLM(arch).state_dict()
    pipe = pipeline_module(arch, num_stages=world)
    load_from_full(pipe, full, arch.num_hidden_layers)
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
    _spawn(_pp_worker, 2, ARCH.model_copy(update=dict(tie_word_embeddings=tie)).model_dump_json())
