"""Endpoints clients expect beside the OpenAI ones: vLLM's /tokenize and /detokenize, and a model's own chat template.

The chat template is one written here into a tiny model directory, rendered by the
server and compared with what transformers' `apply_chat_template` makes of the same
directory (the reference implementation of Hugging Face chat templates).
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from transformers import AutoTokenizer

from serve_helpers import RunningServer, serve_config
from neox_runtime.serve.config import SafetyConfig

# A ChatML-like template: BOS, a header per message naming role (and name), an end-of-turn token, roles checked.
TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% if loop.first and m['role'] == 'assistant' %}"
    "{{ raise_exception('a conversation must not start with the assistant') }}{% endif %}"
    "<|{{ m['role'] }}{% if m['name'] is defined %} {{ m['name'] }}{% endif %}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
END_OF_TURN = 300  # the template's eos_token: not the model's EOS (0), so it becomes a stop token of chats
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there", "name": "alice"},
            {"role": "assistant", "content": "the model"}, {"role": "user", "content": "and the cluster?"}]


def templated_dir(model_dir, tmp_path, where: str):
    """A copy of the tiny model whose chat template lives in tokenizer_config.json or chat_template.jinja."""
    path = tmp_path / f"templated-{where}"
    shutil.copytree(model_dir, path)
    eos = json.loads((model_dir / "tokenizer.json").read_text())
    eos_text = next(t for t, i in eos["model"]["vocab"].items() if i == END_OF_TURN)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
              "eos_token": eos_text}
    if where == "tokenizer_config":
        config["chat_template"] = TEMPLATE
    else:
        (path / "chat_template.jinja").write_text(TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module", params=["tokenizer_config", "chat_template.jinja"])
def templated(request, model_dir, tmp_path_factory):
    path = templated_dir(model_dir, tmp_path_factory.mktemp("tpl"), request.param)
    srv = RunningServer(serve_config(path))
    srv.hf = AutoTokenizer.from_pretrained(path)
    yield srv
    srv.stop()


def post(srv, path, body, **kw):
    return httpx.post(srv.url + path, json=body, timeout=120, **kw)


def test_chat_renders_the_model_template_as_transformers_does(templated):
    expected_text = templated.hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    expected = templated.hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True,
                                                return_dict=False)
    assert expected_text.startswith("<|endoftext|><|system|>\nBe brief.") and "<|user alice|>" in expected_text
    tok = post(templated, "/tokenize", {"messages": MESSAGES}).json()
    assert tok["tokens"] == list(expected) and tok["count"] == len(expected)
    chat = post(templated, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == len(expected)

    cont = MESSAGES[:2] + [{"role": "assistant", "content": "Sure, the"}]
    ref = templated.hf.apply_chat_template(cont, tokenize=False, continue_final_message=True)
    got = post(templated, "/tokenize", {"messages": cont, "add_generation_prompt": False,
                                        "continue_final_message": True, "return_token_strs": True}).json()
    assert templated.hf.decode(got["tokens"]) == ref and ref.endswith("Sure, the")
    assert got["token_strs"] == templated.hf.convert_ids_to_tokens(got["tokens"])


def test_template_end_of_turn_token_stops_a_chat(templated):
    r = post(templated, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 5,
                                                 "logit_bias": {str(END_OF_TURN): 100}}).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1


def test_template_refusal_is_a_400_naming_messages(templated):
    r = post(templated, "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hello"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "must not start with the assistant" in r.json()["error"]["message"]
    assert post(templated, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}).status_code == 200


def test_without_a_template_chat_uses_the_plain_transcript(server):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi", "name": "bob"}]
    expected = server.state.tokenizer.encode("Be brief.\n\nUser (bob): hi\nAssistant:").ids
    assert post(server, "/tokenize", {"messages": msgs}).json()["tokens"] == expected
    r = post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == len(expected)
    cont = post(server, "/tokenize", {"messages": msgs + [{"role": "assistant", "content": "Sure"}],
                                      "add_generation_prompt": False, "continue_final_message": True}).json()
    assert server.state.tokenizer.decode(cont["tokens"]).endswith("User (bob): hi\nAssistant: Sure")


def test_tokenize_and_detokenize_have_vllm_shapes(server):
    text = "the model serves tokens"
    r = post(server, "/tokenize", {"prompt": text, "model": "tiny-neox"}).json()
    ids = server.state.tokenizer.encode(text).ids
    assert r == {"count": len(ids), "max_model_len": server.state.max_len, "tokens": ids}
    assert post(server, "/tokenize", {"prompt": ""}).json() == {"count": 0, "max_model_len": server.state.max_len,
                                                                "tokens": []}
    assert post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": text}
    assert post(server, "/detokenize", {"tokens": [0] + ids[:1]}).json()["prompt"].startswith("<|endoftext|>")


@pytest.mark.parametrize("path,body,status,param", [
    ("/tokenize", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/tokenize", {"prompt": "a\ud800"}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "add_generation_prompt": True}, 400, "add_generation_prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": True,
                   "continue_final_message": True}, 400, "messages"),
    ("/tokenize", [1, 2], 400, None),
    ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/detokenize", {"prompt": "x"}, 400, None),
])
def test_bad_tokenize_requests_are_4xx_naming_the_field(server, path, body, status, param):
    r = httpx.post(server.url + path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param


def test_tokenize_endpoints_take_the_api_key(model_dir, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("sk-tokenize-test\n")
    srv = RunningServer(serve_config(model_dir, safety=SafetyConfig(api_keys_file=keys)))
    try:
        for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5]})):
            assert post(srv, path, body).status_code == 401
            assert post(srv, path, body, headers={"Authorization": "Bearer sk-wrong"}).status_code == 401
            assert post(srv, path, body, headers={"Authorization": "Bearer sk-tokenize-test"}).status_code == 200
    finally:
        srv.stop()


def test_chat_template_flag_overrides_the_directory_and_a_broken_one_stops_the_start(model_dir, tmp_path):
    from neox_runtime.serve.api.app import build_state
    from neox_runtime.serve.cli import parse_args

    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    cfg = parse_args(["--model", str(model_dir), "--chat-template", str(template), "--max-num-seqs", "2",
                      "--max-num-batched-tokens", "64"])
    assert cfg.chat_template == template
    cfg.port = serve_config(model_dir).port
    srv = RunningServer(cfg)
    try:
        hf = AutoTokenizer.from_pretrained(model_dir)
        eos = hf.convert_ids_to_tokens(0)  # no tokenizer_config.json: the model's EOS ends a turn
        expected = hf.apply_chat_template(MESSAGES, chat_template=TEMPLATE, tokenize=True, add_generation_prompt=True,
                                          return_dict=False, bos_token=eos, eos_token=eos)
        assert post(srv, "/tokenize", {"messages": MESSAGES}).json()["tokens"] == list(expected)
    finally:
        srv.stop()
    template.write_text("{% for m in messages %}{{ m['content'] }")
    cfg = parse_args(["--model", str(model_dir), "--chat-template", str(template)])
    with pytest.raises(ValueError, match="chat.jinja does not compile"):
        build_state(cfg)
