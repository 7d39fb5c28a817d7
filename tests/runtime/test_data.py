"""Token shards, the resumable sampler, and neox-data on a real local corpus (stdlib sources)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from hypothesis import given, settings, strategies as st

from runtime_helpers import CORPUS_DIR, env
from neox_runtime.data.shards import ResumableSampler, TokenShards, batches, train_validation_split


@settings(max_examples=60, deadline=None)
@given(num_windows=st.integers(3, 50), seed=st.integers(0, 2**31), global_batch=st.sampled_from([2, 4, 8]),
       steps=st.integers(1, 30), stop=st.integers(0, 30), dp_before=st.sampled_from([1, 2]),
       dp_after=st.sampled_from([1, 2, 4]))
def test_sampler_resume_on_any_dp_size_continues_with_next_global_samples(
        num_windows, seed, global_batch, steps, stop, dp_before, dp_after):
    stop = min(stop, steps)
    dp_after = min(dp_after, global_batch)
    reference = ResumableSampler(num_windows, seed)
    expected = [reference.next_batch(global_batch, 0, 1) for _ in range(steps)]

    def one_step(sampler, dp):
        state = sampler.state_dict()
        out = []
        for rank in range(dp):  # every rank computes its slice from the same state
            sampler.load_state_dict(state)
            out += sampler.next_batch(global_batch, rank, dp)
        return out

    first = ResumableSampler(num_windows, seed)
    got = [one_step(first, dp_before) for _ in range(stop)]
    second = ResumableSampler(num_windows, seed)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [one_step(second, dp_after) for _ in range(steps - stop)]
    assert got == expected


def test_sampler_visits_every_window_once_per_epoch():
    sampler = ResumableSampler(10, seed=3)
    first_epoch = sampler.next_batch(10, 0, 1)
    second_epoch = sampler.next_batch(10, 0, 1)
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(10))
    assert first_epoch != second_epoch


def test_windows_cross_shard_borders_and_validation_is_held_out(byte_data):
    shards = TokenShards(byte_data)
    stream = np.concatenate([np.fromfile(byte_data / f"{s['name']}.bin", dtype=np.uint16)
                             for s in shards.manifest["shards"]])
    train, val = train_validation_split(shards, 64, 0.1)
    assert train.count + val.count == (len(stream) - 1) // 64 and val.first == train.count
    border = shards.starts[1]
    i = border // 64  # the window containing the first shard border
    assert np.array_equal(train.window(i), stream[i * 64:i * 64 + 65])
    sampler = ResumableSampler(train.count, seed=0)
    for step in batches(train, sampler, 4, 2, 0, 1):
        assert len(step) == 2 and step[0].shape == (4, 65)
        break
    assert all(idx < train.count for idx in ResumableSampler(train.count, 0).next_batch(train.count, 0, 1))


def test_neox_data_tokenizes_corpus_losslessly_with_ray(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sources = sorted(Path(CORPUS_DIR).glob("*.py"))[:6]
    for f in sources:
        (corpus / f.name).write_bytes(f.read_bytes())
    jsonl = corpus / "extra.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"document number {i}"}) for i in range(5)) + "\n")

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "neox_runtime.data.cli", *args], env=env(),
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run("train-tokenizer", str(corpus), "--vocab-size", "400", "--output", str(tmp_path / "tok.json"))
    out = run("tokenize", str(corpus), "--tokenizer", str(tmp_path / "tok.json"), "--output",
              str(tmp_path / "shards"), "--shards", "3")
    assert "tokens/s" in out.stdout

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tmp_path / "tok.json"))
    shards = TokenShards(tmp_path / "shards")
    assert len(shards.manifest["shards"]) == 3 and shards.vocab_size == 400
    decoded = set()
    for entry in shards.manifest["shards"]:
        tokens = np.fromfile(tmp_path / "shards" / f"{entry['name']}.bin", dtype=np.uint16)
        offsets = shards.documents(entry["name"])
        assert offsets[-1] == len(tokens) and len(offsets) == entry["documents"] + 1
        for a, b in zip(offsets[:-1], offsets[1:]):
            assert tokens[b - 1] == 0  # every document ends in <|endoftext|>
            decoded.add(tokenizer.decode(tokens[a:b - 1].tolist()))
    expected = {f.read_text() for f in sources} | {f"document number {i}" for i in range(5)}
    assert decoded == expected
    stats = json.loads(run("stats", str(tmp_path / "shards")).stdout)
    assert stats["documents"] == 11 and 0 < stats["unigram_entropy"] < np.log(400)


def test_neox_data_names_the_bad_argument(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "neox_runtime.data.cli", "train-tokenizer", str(tmp_path / "nope"),
                           "--vocab-size", "500", "--output", str(tmp_path / "t.json")], env=env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "input" in proc.stderr
