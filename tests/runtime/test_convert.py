"""neox-convert: every ZeRO stage converts to the same HF weights; HF dirs seed fine-tuning (init_from)."""

import subprocess
import sys

import pytest
import torch
import transformers

from runtime_helpers import TINY_ARCH, env, neox_train, write_config
from neox_runtime.checkpoint.convert import deepspeed_to_hf
from neox_runtime.checkpoint.hf import load_hf_model


def _train(tmp_path, name, data, nproc, **over):
    fields = dict(architecture={**TINY_ARCH, "tie_word_embeddings": True}, train_data=str(data), seq_length=32,
                  micro_batch_size=2, gradient_accumulation_steps=4 // nproc, train_steps=3, warmup_steps=1,
                  lr=3e-3, min_lr=3e-4, checkpoint_dir=str(tmp_path / f"ckpt-{name}"), checkpoint_interval=100,
                  eval_interval=100, seed=11)
    fields.update(over)
    proc = neox_train(write_config(tmp_path / f"{name}.yaml", **fields), nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / f"ckpt-{name}"


def _convert(checkpoint_dir, output, *extra):
    proc = subprocess.run([sys.executable, "-m", "neox_runtime.checkpoint.convert", "to-hf", str(checkpoint_dir),
                           str(output), *extra], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return output


@pytest.mark.slow
def test_every_zero_stage_converts_to_the_same_hf_model(tmp_path, byte_data):
    checkpoints = {z: _train(tmp_path, f"z{z}", byte_data, 1 if z == 0 else 2, zero_stage=z) for z in (0, 2, 3)}
    dirs = {z: deepspeed_to_hf(c, tmp_path / f"hf{z}") for z, c in checkpoints.items() if z != 3}
    dirs[3] = _convert(checkpoints[3], tmp_path / "hf3")  # the CLI
    states = {z: load_hf_model(d)[0].state_dict() for z, d in dirs.items()}
    for key, value in states[0].items():
        for z in (2, 3):
            assert (states[z][key] - value).abs().max().item() <= 1e-5, (z, key)
    ref = transformers.GPTNeoXForCausalLM.from_pretrained(dirs[3]).eval()
    ours, _ = load_hf_model(dirs[3])
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_init_from_hf_dir_starts_training_from_those_weights(tmp_path, byte_data):
    source = deepspeed_to_hf(_train(tmp_path, "base", byte_data, 1), tmp_path / "hf-base")
    # a vanishing LR: after one step the weights are still the ones we started from
    tuned = _train(tmp_path, "tuned", byte_data, 1, init_from=str(source), train_steps=1, lr=1e-12, min_lr=0.0,
                   seed=99)
    before = load_hf_model(source)[0].state_dict()
    after = load_hf_model(deepspeed_to_hf(tuned, tmp_path / "hf-tuned"))[0].state_dict()
    assert all((after[k] - before[k]).abs().max().item() < 1e-6 for k in before)


def test_convert_without_checkpoint_names_the_problem(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "neox_runtime.checkpoint.convert", "to-hf", str(tmp_path),
                           str(tmp_path / "out")], env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr
