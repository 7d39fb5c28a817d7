"""neox-train with tensor parallel 2 and pipeline parallel 2 trains exactly like one rank.

Same global batch, gradient clipping on (it needs norms summed across TP ranks and
pipeline stages); the checkpoints of every layout convert to the same HF weights.
"""

import pytest
import torch

from runtime_helpers import TINY_ARCH, losses, neox_train, write_config
from neox_runtime.checkpoint.convert import read_training_state


def _train(tmp_path, name, data, nproc, **over):
    fields = dict(architecture=TINY_ARCH, train_data=str(data), seq_length=32, micro_batch_size=2,
                  gradient_accumulation_steps=2, train_steps=5, warmup_steps=1, lr=3e-3, min_lr=3e-4, grad_clip=0.5,
                  checkpoint_dir=str(tmp_path / f"ckpt-{name}"), checkpoint_interval=100, eval_interval=5,
                  eval_iters=2, progress_file=str(tmp_path / f"{name}.jsonl"), seed=5)
    fields.update(over)
    return neox_train(write_config(tmp_path / f"{name}.yaml", **fields), nproc)


def _run(tmp_path, name, data, nproc, **over):
    proc = _train(tmp_path, name, data, nproc, **over)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(tmp_path / f"{name}.jsonl"), tmp_path / f"ckpt-{name}"


@pytest.mark.slow
def test_tensor_and_pipeline_parallel_match_one_rank(tmp_path, byte_data):
    ref_losses, ref_ckpt = _run(tmp_path, "single", byte_data, 1)
    reference, _ = read_training_state(ref_ckpt)
    for name, layout in (("tp2", dict(tensor_parallel=2)), ("pp2", dict(pipeline_parallel=2))):
        got, ckpt = _run(tmp_path, name, byte_data, 2, **layout)
        assert sorted(got) == sorted(ref_losses) == [1, 2, 3, 4, 5]
        for step, loss in ref_losses.items():
            assert abs(got[step] - loss) <= 1e-5, (name, step, got[step], loss)
        state, client = read_training_state(ckpt)
        assert client["step"] == 5 and set(state) == set(reference)
        for key, value in reference.items():
            assert (state[key] - value).abs().max().item() <= 1e-5, (name, key)


@pytest.mark.slow
def test_bf16_and_fp16_train_close_to_fp32(tmp_path, byte_data):
    fp32, _ = _run(tmp_path, "fp32", byte_data, 1, zero_stage=1, eval_interval=100)
    bf16, _ = _run(tmp_path, "bf16", byte_data, 1, zero_stage=1, precision="bf16", eval_interval=100)
    assert all(abs(bf16[s] - fp32[s]) < 0.05 for s in fp32), (bf16, fp32)  # ZeRO 1 keeps fp32 masters
    # DeepSpeed's CPU accelerator offers fp16 only where oneDNN has fp16 kernels (AVX512-FP16 or
    # AMX-FP16); elsewhere the run must be refused up front with a message that says why.
    if not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        proc = _train(tmp_path, "fp16", byte_data, 1, zero_stage=1, precision="fp16", eval_interval=100)
        assert proc.returncode == 2 and "fp16 is not supported" in proc.stderr, proc.stderr[-3000:]
        return
    # fp16: dynamic loss scaling starts at 2^16 and skips the overflowing first step(s)
    fp16, _ = _run(tmp_path, "fp16", byte_data, 1, zero_stage=1, precision="fp16", eval_interval=100)
    assert abs(fp16[1] - fp32[1]) < 0.05 and fp16[5] < fp16[1] - 0.3, fp16
