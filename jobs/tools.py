"""Tool calls (OpenAI's function calling): the request's tools into the prompt, the choice into a grammar, and the
model's answer back into ``tool_calls``.

    plan = plan_tools(tools, choice, tokenizer)  # None when there are no tools
    messages, kwargs = plan.messages(history)    # the history for the chat template, tools described
    params: guided=plan.guided                   # required / a named function: one call, always parseable
    calls = plan.parse(text)                     # [{"id", "type": "function", "function": {...}}] or None

``tool_choice``: ``none`` (the tools are still shown, no call is made), ``required`` (one call of any of the tools),
a named function (one call of it), ``auto`` (the model decides; only for a model whose chat template renders tools,
whose answer is then read for a call, else a ToolError that says so). Required and named calls are enforced with a
grammar on ``{"name": ..., "arguments": {...}}``, the arguments held to the function's JSON schema, so they always
parse. A template that renders tools gets them as ``tools=``; for one that does not, they are described in a system
message.

``parallel_tool_calls`` (OpenAI's default: true) lets an answer hold several calls: the grammar then also takes a
JSON list of calls, and ``auto`` reads every ``<tool_call>`` block. With ``parallel_tool_calls: false`` the grammar
takes one call, and of an ``auto`` answer only the first call is kept.

Streamed (``stream: true``), an answer that is or may be a call is held back until it ends, then sent as one
``delta.tool_calls`` chunk with each call whole (OpenAI's clients join deltas, so one is as good as many); an ``auto``
answer that turns out to be text is streamed from the moment it cannot be a call (``may_be_call``).

The OpenAI routes (serve/tools.py) and batch rows (jobs.batch_infer's ``tools``, ``tool_choice`` and
``parallel_tool_calls`` columns) both plan their calls here; a ToolError names the field at fault.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from engine.sampling import Guided


class ToolError(ValueError):
    """A request whose tools cannot run as asked; ``param`` names the field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)  # Hermes / Qwen style, the common template form


def renders_tools(tokenizer) -> bool:
    """Whether the model's chat template does something with ``tools``."""
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


@dataclass
class ToolPlan:
    tools: list[dict]  # OpenAI's function definitions, as sent
    choice: str  # "none", "auto", "required" or the named function
    native: bool  # the chat template renders tools itself
    parallel: bool = True  # several calls per answer allowed (parallel_tool_calls)

    @property
    def guided(self) -> Guided | None:
        if self.choice in ("none", "auto"):
            return None
        fns = [t for t in self.tools if self.choice == "required" or t["name"] == self.choice]
        options = [{"type": "object", "properties": {"name": {"enum": [f["name"]]},
                                                     "arguments": f.get("parameters") or {"type": "object"}},
                    "required": ["name", "arguments"]} for f in fns]
        one = options[0] if len(options) == 1 else {"anyOf": options}
        if self.parallel:  # one call, or a list of them
            one = {"anyOf": [*options, {"type": "array", "items": one, "minItems": 1}]}
        return Guided("json_schema", json.dumps(one))

    @property
    def holds_back(self) -> bool:
        """Whether a streamed answer is held back while it may be a call (every choice but ``none``)."""
        return self.choice != "none"

    def may_be_call(self, text: str) -> bool:
        """Whether an answer that begins with ``text`` may still be a tool call (always, for a call the grammar
        enforces)."""
        if self.choice != "auto":
            return self.choice != "none"
        head = text.lstrip()
        return head[:1] in ("", "{", "[") or head.startswith("<tool_call>") or "<tool_call>".startswith(head)

    def messages(self, messages: list[dict]) -> tuple[list[dict], dict]:
        """The history (OpenAI's messages: role, content, an assistant's ``tool_calls``, a tool message's
        ``tool_call_id``) for the chat template, and the keyword arguments it takes (``tools`` where it renders
        them). ToolError for a call whose arguments are not a JSON object."""
        out = []
        for m in messages:
            msg = {"role": m["role"], "content": m.get("content")}
            if m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}
                         for c in m["tool_calls"]]
                if self.native:
                    msg["tool_calls"] = [{"type": "function", "function": c} for c in calls]
                else:  # a template without tools reads the call as the assistant's text
                    msg["content"] = (m.get("content") or "") + "".join(json.dumps(c) for c in calls)
            if m.get("tool_call_id") and self.native:
                msg["tool_call_id"] = m["tool_call_id"]
            out.append(msg)
        if self.native:
            return out, {"tools": [{"type": "function", "function": f} for f in self.tools]}
        note = ("You can call these functions. To call one, answer with JSON: {\"name\": <function name>, "
                "\"arguments\": <its arguments>}" + ("; to call several, a JSON list of such objects" if self.parallel
                                                     else "") + ".\n" + json.dumps(self.tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{note}"}
        else:
            out.insert(0, {"role": "system", "content": note})
        return out, {}

    def parse(self, text: str) -> list[dict] | None:
        """The tool calls in the model's answer (None when it holds none)."""
        if self.choice == "none":
            return None
        found = [m.group(1) for m in _CALL.finditer(text)] or [text.strip()]
        names, calls = {t["name"] for t in self.tools}, []
        for raw in found:
            try:
                value = json.loads(raw)
            except ValueError:
                continue
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict) and item.get("name") in names and isinstance(item.get("arguments"), dict):
                    calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                  "function": {"name": item["name"], "arguments": json.dumps(item["arguments"])}})
        return (calls if self.parallel else calls[:1]) or None


def plan_tools(tools: list[dict] | None, choice: str | None, tokenizer, parallel: bool = True,
               other_grammar: bool = False) -> ToolPlan | None:
    """How a request's tools are handled: ``tools`` are OpenAI's function definitions (name, description,
    parameters), ``choice`` ``none``/``auto``/``required`` or a function's name (None: auto), ``other_grammar``
    whether the request also asks for a response format. None for a request without tools; ToolError for one that
    cannot run."""
    if not tools:
        if choice not in (None, "none"):
            raise ToolError("tool_choice needs tools", "tool_choice")
        return None
    names = [t.get("name") for t in tools]
    if len(set(names)) < len(names):
        raise ToolError(f"tools: function names repeat ({names})", "tools")
    choice = choice or "auto"
    if choice not in ("none", "auto", "required") and choice not in names:
        raise ToolError(f"tool_choice names {choice!r}, which is not among the tools {names}", "tool_choice")
    native = renders_tools(tokenizer)
    if choice == "auto" and not native:
        raise ToolError("tool_choice auto needs a model whose chat template renders tools, and this model's does "
                        "not: ask for tool_choice required, or name the function", "tool_choice")
    if other_grammar and choice not in ("none", "auto"):
        raise ToolError("a tool call and a response format both shape the answer: ask for one", "response_format")
    return ToolPlan(tools, choice, native, parallel=parallel)


def _arguments(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise ToolError(f"messages: a tool call's arguments are not JSON: {e}", "messages") from e
    if not isinstance(parsed, dict):
        raise ToolError("messages: a tool call's arguments must be a JSON object", "messages")
    return parsed
