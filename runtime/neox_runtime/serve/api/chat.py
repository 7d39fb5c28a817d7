"""How chat messages become one prompt: the model's Hugging Face chat template, else a plain transcript.

Template: `--chat-template FILE`, else `chat_template.jinja` in the model directory, else
`chat_template` in its `tokenizer_config.json` (a string, or a list of named templates of
which "default" is used). It is rendered as transformers renders it: a sandboxed jinja2
environment (trim_blocks, lstrip_blocks, loop controls, `tojson`, `raise_exception`,
`strftime_now`) given `messages` (dicts of role, content and name),
`add_generation_prompt` and the tokenizer's special tokens (`bos_token`, `eos_token`, ...,
from tokenizer_config.json, else config.json's ids). A template that raises (say, "roles
must alternate") refuses the request with a 400. "developer" messages are passed as
"system". When the template's `eos_token` is not the model's EOS (ChatML's `<|im_end|>`,
say), it also ends a turn, as a stop token. `continue_final_message` (/tokenize) renders
without the generation prompt and cuts right after the final message's text.

Base Pythia/NeoX checkpoints have no template, so the server falls back to this plain
transcript, which such models continue sensibly:

    {system prompt}\n\n          (when there is one; the server's steering prompt first)
    User: {user message}\n        ("User (name): ..." when the message has a name)
    Assistant: {assistant message}\n
    ...
    Assistant:

Generation stops at "\nUser:" (a stop string added to every chat request), so the model
answers one turn. The server's `--system-prompt` (steering) always comes first and
cannot be displaced by a client's system message, which follows it (with a template it
is a system message of its own, the first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

TURN_STOP = "\nUser:"
_ROLE = {"user": "User", "assistant": "Assistant"}
_CONTINUE_MARK = "\x00neox-continue\x00"  # marks where the final message's text ends in a rendering
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class RenderedChat:
    text: str
    stop: tuple[str, ...] = ()  # stop strings the format adds to the request's
    stop_token_ids: tuple[int, ...] = ()


def _transcript(messages: list[dict], add_generation_prompt: bool) -> str:
    system = [m["content"] for m in messages if m["role"] == "system"]
    out = "\n".join(s for s in system if s)
    out = out + "\n\n" if out else ""
    for m in messages:
        if m["role"] in _ROLE:
            speaker = f"{_ROLE[m['role']]} ({m['name']})" if m.get("name") else _ROLE[m["role"]]
            out += f"{speaker}: {m['content']}\n"
    return out + "Assistant:" if add_generation_prompt else out


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _template_source(model_dir: Path, config: dict) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class ChatFormat:
    """Renders messages with a template when given one (jinja2 source), else as the plain transcript."""

    def __init__(self, template: str | None = None, special_tokens: dict[str, str] | None = None,
                 end_of_turn_id: int | None = None):
        self.special_tokens = special_tokens or {}
        self.end_of_turn_id = end_of_turn_id
        self.template = _compile(template) if template is not None else None

    @classmethod
    def from_model_dir(cls, model_dir: Path, tokenizer, eos_token_id: int | None,
                       template_file: Path | None = None) -> "ChatFormat":
        """The directory's template (or `template_file`, which wins) with its special tokens."""
        config_file = Path(model_dir) / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        source = Path(template_file).read_text() if template_file else _template_source(Path(model_dir), config)
        special = {k: _token_text(config[k]) for k in SPECIAL_TOKEN_KEYS if _token_text(config.get(k))}
        if "additional_special_tokens" in config:
            special["additional_special_tokens"] = [_token_text(t) for t in config["additional_special_tokens"]]
        if source is None:
            return cls()
        model_config = Path(model_dir) / "config.json"
        bos_token_id = json.loads(model_config.read_text()).get("bos_token_id") if model_config.is_file() else None
        for key, token_id in (("bos_token", bos_token_id), ("eos_token", eos_token_id)):
            if key not in special and isinstance(token_id, int) and tokenizer.id_to_token(token_id) is not None:
                special[key] = tokenizer.id_to_token(token_id)  # config.json's ids when the tokenizer names none
        turn_end = tokenizer.token_to_id(special["eos_token"]) if "eos_token" in special else None
        try:
            return cls(source, special, turn_end if turn_end != eos_token_id else None)
        except Exception as exc:  # noqa: BLE001 - a broken template must stop the server at start, by name
            raise ValueError(f"chat template of {template_file or model_dir} does not compile: {exc}") from exc

    def render(self, messages: list[dict], *, steering: str | None = None, add_generation_prompt: bool = True,
               continue_final_message: bool = False) -> RenderedChat:
        """messages: [{"role", "content", optional "name"}], already moderated. ValueError for the client's mistakes."""
        if add_generation_prompt and continue_final_message:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        msgs = ([{"role": "system", "content": steering}] if steering else []) + [
            {**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
        if continue_final_message:  # render with a marker after the final message's text, cut there
            if not msgs[-1]["content"]:
                raise ValueError("continue_final_message: the final message has no content to continue")
            msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + _CONTINUE_MARK}
        if self.template is None:
            rendered = RenderedChat(_transcript(msgs, add_generation_prompt), stop=(TURN_STOP,))
        else:
            try:
                text = self.template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                            **self.special_tokens)
            except Exception as exc:  # noqa: BLE001 - raise_exception, or messages the template cannot take
                raise ValueError(f"the model's chat template refused these messages: {exc}") from None
            ids = (self.end_of_turn_id,) if self.end_of_turn_id is not None else ()
            rendered = RenderedChat(text, stop_token_ids=ids)
        if continue_final_message:
            at = rendered.text.find(_CONTINUE_MARK)
            if at < 0:
                raise ValueError("continue_final_message: the chat template does not render the final message")
            rendered = RenderedChat(rendered.text[:at], rendered.stop, rendered.stop_token_ids)
        return rendered


def _compile(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)
