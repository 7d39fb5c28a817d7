"""HF directories round-trip between our model and transformers, in every weight layout."""

import json

import torch
import transformers

from neox_runtime.api.architecture import ModelArchitecture
from neox_runtime.checkpoint.hf import load_hf_model, save_hf_model
from neox_runtime.model import GPTNeoXForCausalLM

ARCH = ModelArchitecture(vocab_size=67, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, rotary_pct=0.5, rotary_emb_base=1000.0,
                         max_position_embeddings=64, use_parallel_residual=False, hidden_act="gelu_fast")
IDS = torch.randint(0, 67, (2, 11), generator=torch.Generator().manual_seed(0))


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_saved_dir_loads_in_transformers_with_equal_logits(tmp_path):
    torch.manual_seed(1)
    ours = GPTNeoXForCausalLM(ARCH).eval()
    save_hf_model(ours, ARCH, tmp_path)
    ref = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert _max_diff(ours(IDS), ref(IDS).logits) <= 1e-5


def test_transformers_saved_dir_loads_in_ours(tmp_path):
    torch.manual_seed(2)
    ref = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**ARCH.to_hf_config())).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours, arch = load_hf_model(tmp_path)
    assert arch == ARCH
    with torch.no_grad():
        assert _max_diff(ours(IDS), ref(IDS).logits) <= 1e-5


def test_sharded_and_tied_round_trip_with_tokenizer(tmp_path):
    arch = ARCH.model_copy(update=dict(tie_word_embeddings=True))
    torch.manual_seed(3)
    ours = GPTNeoXForCausalLM(arch).eval()
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    out = save_hf_model(ours, arch, tmp_path / "m", tokenizer_file=tok, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert (out / "tokenizer.json").read_text() == "{}"
    back, _ = load_hf_model(out)
    assert back.embed_out.weight.data_ptr() == back.gpt_neox.embed_in.weight.data_ptr()
    ref = transformers.GPTNeoXForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert _max_diff(back(IDS), ours(IDS)) == 0
        assert _max_diff(ref(IDS).logits, ours(IDS)) <= 1e-5


def test_newer_config_keys_and_pytorch_bin(tmp_path):
    torch.manual_seed(4)
    ours = GPTNeoXForCausalLM(ARCH).eval()
    config = ARCH.to_hf_config()
    del config["rotary_pct"], config["rotary_emb_base"]
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(ours.state_dict(), tmp_path / "pytorch_model.bin")
    back, arch = load_hf_model(tmp_path, dtype=torch.bfloat16)
    assert arch == ARCH and back.embed_out.weight.dtype == torch.bfloat16
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value.bfloat16()), key
