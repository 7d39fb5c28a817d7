"""The chat template for base (non-instruction-tuned) GPT-NeoX models.

Base Pythia/NeoX checkpoints have no chat format, so the server uses this plain
transcript, which such models continue sensibly:

    {system prompt}\n\n          (when there is one; the server's steering prompt first)
    User: {user message}\n
    Assistant: {assistant message}\n
    ...
    Assistant:

Generation stops at "\nUser:" (a stop string added to every chat request), so the model
answers one turn. "developer" messages count as system messages. The server's
`--system-prompt` (steering) always comes first and cannot be displaced by a
client's system message, which follows it.
"""

from __future__ import annotations

from neox_runtime.serve.api.protocol import ChatMessage

TURN_STOP = "\nUser:"
_ROLE = {"user": "User", "assistant": "Assistant"}


def render(messages: list[ChatMessage], steering: str | None = None) -> str:
    system = [steering] if steering else []
    system += [m.text() for m in messages if m.role in ("system", "developer")]
    out = "\n".join(s for s in system if s)
    out = out + "\n\n" if out else ""
    for m in messages:
        if m.role in _ROLE:
            out += f"{_ROLE[m.role]}: {m.text()}\n"
    return out + "Assistant:"
