"""Tool calls on the OpenAI routes: a chat request's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` planned
by jobs.tools (what the chat template shows, the grammar of a required or named call, how an answer is read back
into ``tool_calls``), a plan that cannot run refused with a 400 naming the field."""

from __future__ import annotations

from jobs.tools import ToolError, ToolPlan
from jobs.tools import plan_tools as _plan
from serve.protocol import APIError, ChatRequest

__all__ = ["ToolPlan", "history", "plan_tools"]


def plan_tools(body: ChatRequest, tokenizer) -> ToolPlan | None:
    """How the request's tools are handled; None for a request without tools. APIError for one that cannot run."""
    choice = body.tool_choice if body.tool_choice is None or isinstance(body.tool_choice, str) else \
        body.tool_choice.function.name
    tools = [t.function.model_dump(exclude_none=True, by_alias=True) for t in body.tools or ()]
    try:
        return _plan(tools, choice, tokenizer, parallel=body.parallel_tool_calls is not False,
                     other_grammar=body.response_format is not None)
    except ToolError as e:
        raise APIError(400, str(e), e.param) from e


def history(plan: ToolPlan, body: ChatRequest) -> tuple[list[dict], dict]:
    """The request's messages for the chat template, with its tools (ToolPlan.messages); APIError for a call in the
    history whose arguments are not a JSON object."""
    try:
        return plan.messages([m.model_dump(exclude_none=True) for m in body.messages])
    except ToolError as e:
        raise APIError(400, str(e), e.param) from e
