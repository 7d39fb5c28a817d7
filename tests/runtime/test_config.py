"""TrainConfig validation, config files in every accepted form, the LR schedule and DeepSpeed JSON."""

import json
import math
from pathlib import Path

import pytest
import yaml

from neox_runtime.api.deepspeed import deep_merge
from neox_runtime.parallel.deepspeed_config import build_deepspeed_config, lr_at
from neox_runtime.train.config import TrainConfig, load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _cfg(**over):
    fields = dict(architecture="tiny", train_data="/data", checkpoint_dir="/ckpt")
    fields.update(over)
    return TrainConfig(**fields)


@pytest.mark.parametrize("field,value", [
    ("zero_stage", 4), ("precision", "fp8"), ("micro_batch_size", 0), ("min_lr", 1.0), ("lr", -1.0),
    ("tensor_parallel", 3), ("seq_length", 4096), ("validation_fraction", 1.0), ("betas", (0.9, 1.2)),
    ("train_data", ""), ("lr_decay", "step"),
])
def test_invalid_field_is_named_in_the_error(field, value):
    with pytest.raises(ValueError, match=field):
        _cfg(**{field: value})


def test_architecture_from_preset_name_or_overrides():
    assert _cfg().architecture.hidden_size == 64
    cfg = _cfg(architecture={"preset": "pythia-70m", "num_hidden_layers": 2})
    assert (cfg.architecture.hidden_size, cfg.architecture.num_hidden_layers) == (512, 2)
    with pytest.raises(ValueError, match="architecture"):
        _cfg(architecture={"preset": "pythia-70m", "num_attention_heads": 7})


def test_world_size_must_fit_the_parallel_layout():
    cfg = _cfg(tensor_parallel=2, pipeline_parallel=2)
    assert cfg.validate_world(8) == 2
    with pytest.raises(ValueError, match="tensor_parallel x pipeline_parallel"):
        cfg.validate_world(6)


def test_yaml_and_json_files_round_trip(tmp_path):
    cfg = _cfg(zero_stage=2, deepspeed={"zero_optimization": {"overlap_comm": True}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert load_config(tmp_path / "c.yaml") == cfg == load_config(tmp_path / "c.json")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "learning_rate": 1}))
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(tmp_path / "bad.yaml")


def test_neoxtraining_manifest_is_accepted(tmp_path):
    manifest = EXAMPLES / "training-tiny-cpu.yaml"
    if not manifest.exists():
        pytest.skip("example manifest not present")
    cfg = load_config(manifest)
    document = yaml.safe_load(manifest.read_text())
    assert cfg.train_steps == document["spec"]["training"]["steps"]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(document["spec"]))
    from_spec = load_config(tmp_path / "spec.yaml")  # a bare spec has no name: checkpoints/local
    assert from_spec.to_dict() | {"checkpoint_dir": ""} == cfg.to_dict() | {"checkpoint_dir": ""}


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = _cfg(lr=1.0, min_lr=0.1, warmup_steps=4, train_steps=20)
    lrs = [lr_at(s, cfg) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert math.isclose(lrs[-1], 0.1) and math.isclose(lr_at(100, cfg), 0.1)
    assert math.isclose(lr_at(19, _cfg(lr=1.0, min_lr=0.1, warmup_steps=4, train_steps=20, lr_decay="linear")), 0.1)


def test_deepspeed_json_has_consistent_batch_and_overrides_merged_last():
    cfg = _cfg(micro_batch_size=4, gradient_accumulation_steps=3, zero_stage=2, precision="bf16",
               deepspeed={"zero_optimization": {"reduce_bucket_size": 123}, "gradient_clipping": 0.5})
    ds = build_deepspeed_config(cfg, data_parallel_size=5)
    assert ds["train_batch_size"] == 4 * 3 * 5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["reduce_bucket_size"] == 123
    assert ds["gradient_clipping"] == 0.5
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


def test_resume_tag_follows_resume_from(tmp_path):
    from neox_runtime.train import checkpoints

    (tmp_path / checkpoints.tag_for(20)).mkdir()
    (tmp_path / checkpoints.tag_for(40)).mkdir()
    checkpoints.write_latest(tmp_path, checkpoints.tag_for(40))
    assert checkpoints.resume_tag(tmp_path, "latest") == "global_step40"
    assert checkpoints.resume_tag(tmp_path, "step-20") == "global_step20"
    assert checkpoints.resume_tag(tmp_path, "none") is None
    with pytest.raises(ValueError, match="resume_from: no checkpoint global_step30"):
        checkpoints.resume_tag(tmp_path, "step-30")
