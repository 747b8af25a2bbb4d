"""The work of the OpenAI generation routes, between a parsed request body and the engine.

    work = Completions(engine, tokenizer, name="smol", default_max_tokens=64, context=2048)
    body = await work.completions(CompletionRequest(...), max_items=64)   # a dict, or a StreamingResponse
    body = await work.chat(ChatRequest(...))

Prompts come as text or token ids; each asks for ``n`` sequences (one prefill, engine.core.Engine.submit_n);
``echo`` with ``logprobs`` gives the prompt's own token log-probabilities, computed in the prefill the request runs
anyway; ``stream: true`` sends server-sent events of every sequence as they come, and the usage in a last chunk of
its own when ``stream_options.include_usage`` asks for it (OpenAI's shape). serve.app's routes parse and delegate
here; the request checks are serve.protocol's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi.responses import StreamingResponse

from compress import data
from engine.interface import EngineClient
from engine.output import TokenBytes
from engine.request import Generation, RequestHandle, RequestOutput, TokenLogprob
from engine.sampling import Guided, SamplingParams
from serve import protocol as oa
from serve import responses as rs
from serve.protocol import APIError, ChatRequest, CompletionRequest, error_body
from serve.tools import ToolPlan, history, plan_tools


class Completions:
    def __init__(self, engine: EngineClient, tokenizer, name: str, default_max_tokens: int, context: int,
                 vocab_size: int, tokenizing: ThreadPoolExecutor | None = None):
        """``tokenizing``: the one thread that encodes text (off the event loop: a prompt of megabytes takes a
        second; one thread: a Rust tokenizer must not encode in two at once)."""
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.tokenizing = tokenizing or ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.default_max_tokens, self.context, self.vocab_size = default_max_tokens, context, vocab_size
        self.token_bytes = TokenBytes(tokenizer)  # what logprobs report for each token id

    async def completions(self, body: CompletionRequest, max_items: int) -> dict | StreamingResponse:
        prompts = oa.prompts_of(body, max_items)
        ids = [await self._ids(p) for p in prompts]
        echo_lp = body.logprobs if body.echo and body.logprobs is not None else None
        params = self.params(body, max(len(i) for i in ids), body.logprobs, prompt_logprobs=echo_lp)
        if body.stream:
            if body.echo:
                raise APIError(400, "echo is not available with stream: true", "echo")
            return await self._sse(ids, params, body.n, chat=False, include_usage=body.include_usage)
        results = await self._generate(ids, params, body.n)
        texts, logprobs = [], []
        for k, g in enumerate(results):
            prompt = ids[k // body.n]
            lp = g.logprobs if body.logprobs is not None else None
            if body.echo:
                head = prompts[k // body.n]
                texts.append((head if isinstance(head, str) else self.tokenizer.decode(prompt)) + g.text)
                if lp is not None:
                    lp = [TokenLogprob(prompt[0], None), *g.prompt_logprobs[1:], *lp]
            else:
                texts.append(g.text)
            logprobs.append(rs.completion_logprobs(lp, self.token_bytes))
        return rs.completion(self.name, texts, [g.finish_reason for g in results], sum(map(len, ids)),
                             sum(len(g.token_ids) for g in results), logprobs,
                             sum(g.num_cached_tokens for g in results[:: body.n]))  # a prompt's, once

    async def chat(self, body: ChatRequest) -> dict | StreamingResponse:
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        plan = plan_tools(body, self.tokenizer)
        if plan is None:
            messages, template_args = [{"role": m.role, "content": m.content} for m in body.messages], {}
        else:
            messages, template_args = history(plan, body)
        try:
            text = await asyncio.to_thread(data.chat_text, self.tokenizer, messages, **template_args)
        except Exception as e:  # a template may reject a message order; that is the request's fault
            message = f"messages could not be formatted with the model's chat template: {e}"
            raise APIError(400, message, "messages") from e
        ids = await self._encode(text, templated=True)
        params = self.params(body, len(ids), (body.top_logprobs or 0) if body.logprobs else None,
                             guided=plan.guided if plan else None)
        if body.stream:
            return await self._sse([ids], params, body.n, chat=True, include_usage=body.include_usage,
                                   tools=plan if plan is not None and plan.holds_back else None)
        results = await self._generate([ids], params, body.n)
        calls = [plan.parse(g.text) if plan else None for g in results]
        return rs.chat_completion(self.name, [g.text for g in results], [g.finish_reason for g in results], len(ids),
                                  sum(len(g.token_ids) for g in results),
                                  [rs.chat_logprobs(g.logprobs, self.token_bytes) for g in results],
                                  results[0].num_cached_tokens, tool_calls=calls)

    def params(self, body, prompt_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None,
               guided: Guided | None = None) -> SamplingParams:
        """The request's SamplingParams; ``guided``: a grammar of the server's own (a required tool call)."""
        settings = oa.generation_settings(body, self.default_max_tokens)
        if prompt_tokens + settings["max_tokens"] > self.context:
            raise APIError(400, f"prompt of {prompt_tokens} tokens + max_tokens {settings['max_tokens']} exceeds the "
                                f"server's limit of {self.context} tokens (max_model_len)", "max_tokens")
        settings |= oa.engine_settings(body, self.vocab_size)
        if guided is not None:
            if "guided" in settings:
                raise APIError(400, "a tool call and a grammar both shape the answer: ask for one", "tool_choice")
            settings["guided"] = guided
        try:
            return SamplingParams(**settings, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        except ValueError as e:  # a combination the engine refuses (a grammar with min_tokens, ...)
            raise APIError(400, str(e)) from e

    # -- the engine -----------------------------------------------------------------------------------------------

    async def _encode(self, text: str, templated: bool) -> list[int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.tokenizing, data.prompt_ids, self.tokenizer, text, templated)

    async def _ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return await self._encode(prompt, templated=False)
        bad = next((t for t in prompt if t >= self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"prompt: token id {bad} is not in this model's vocabulary (0..{self.vocab_size - 1})",
                           "prompt")
        return list(prompt)

    async def _submit(self, ids: list[list[int]], params: SamplingParams, n: int) -> list[RequestHandle]:
        """n handles per prompt, prompt by prompt; a grammar compiles in a worker thread, off the event loop."""
        def submit_all() -> list[RequestHandle]:
            handles = []
            try:
                for prompt in ids:
                    handles += self.engine.submit_n(prompt, params, n)
            except BaseException:
                for h in handles:
                    h.cancel()
                raise
            return handles

        try:
            return await asyncio.to_thread(submit_all) if params.guided is not None else submit_all()
        except ValueError as e:  # a grammar that does not compile, a prompt the engine cannot take
            raise APIError(400, str(e)) from e

    async def _generate(self, ids: list[list[int]], params: SamplingParams, n: int) -> list[Generation]:
        """Every sequence to its end; a caller that goes away cancels them all."""
        handles = await self._submit(ids, params, n)
        try:
            results = await asyncio.gather(*(h.final() for h in handles))
        finally:
            for h in handles:
                h.cancel()
        failed = next((r for r in results if r.error), None)
        if failed is not None:
            raise APIError(500, f"generation failed: {failed.error}", kind="server_error")
        return results

    async def _sse(self, ids: list[list[int]], params: SamplingParams, n: int, chat: bool,
                   include_usage: bool, tools: ToolPlan | None = None) -> StreamingResponse:
        """Server-sent events: chunks of new text for each sequence as it comes, each ending with its finish reason;
        then the usage (when asked for) and [DONE]. With ``tools``, a sequence is held back while it may be a tool
        call (serve.tools), and a call goes out whole in the sequence's last chunk."""
        handles = await self._submit(ids, params, n)
        held = [_Held() for _ in handles] if tools is not None else None
        rid, created = rs.new_id("chatcmpl-" if chat else "cmpl-"), int(time.time())

        def event(choices, usage=None) -> str:
            return f"data: {json.dumps(rs.chunk(chat, rid, created, self.name, choices, usage))}\n\n"

        async def events():
            offsets, generated, cached = [0] * len(handles), 0, 0
            if chat:
                yield event([rs.ChatChunkChoice(index=k, delta=rs.Delta(role="assistant", content=""),
                                                finish_reason=None) for k in range(len(handles))])
            async for k, out in merged(handles):
                if out.error:
                    yield f"data: {json.dumps(error_body(out.error, 'server_error'))}\n\n"
                    break
                if out.finished:
                    generated += out.num_generated_tokens
                    cached += out.num_cached_tokens if k % n == 0 else 0  # a prompt's, once
                calls = None
                if held is not None and held[k].holding:
                    out, calls = held[k].take(out, tools)
                    if out is None:
                        continue
                if out.text or out.finished or out.logprobs:
                    yield event([self._choice(chat, k, out, offsets[k], calls)])
                    offsets[k] += len(out.text)
            else:
                if include_usage:
                    yield event([], rs.usage(sum(map(len, ids)), generated, cached))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def _choice(self, chat: bool, index: int, out: RequestOutput, offset: int, calls: list[dict] | None = None):
        finish = out.finish_reason if out.finished else None
        if calls:
            deltas = [rs.DeltaToolCall(index=i, **c) for i, c in enumerate(calls)]
            return rs.ChatChunkChoice(index=index, delta=rs.Delta(tool_calls=deltas), finish_reason="tool_calls")
        if chat:
            delta = rs.Delta(content=out.text) if out.text else rs.Delta()
            return rs.ChatChunkChoice(index=index, delta=delta, finish_reason=finish,
                                      logprobs=rs.chat_logprobs(out.logprobs, self.token_bytes))
        return rs.CompletionChoice(index=index, text=out.text, finish_reason=finish,
                                   logprobs=rs.completion_logprobs(out.logprobs, self.token_bytes, offset))


class _Held:
    """What a streamed sequence that may be a tool call has said so far, held back until it ends or turns out to be
    text."""

    def __init__(self):
        self.text, self.logprobs, self.holding = "", [], True

    def take(self, out: RequestOutput, tools: ToolPlan) -> tuple[RequestOutput | None, list[dict] | None]:
        """(the event to send now, or None to keep holding; the tool calls of a finished sequence, or None)."""
        self.text += out.text
        self.logprobs += out.logprobs or []
        if not out.finished and tools.may_be_call(self.text):
            return None, None
        self.holding = False
        whole = dataclasses.replace(out, text=self.text, logprobs=self.logprobs or out.logprobs)
        calls = tools.parse(self.text) if out.finished else None
        return whole, calls


async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The events of several requests as they come, each with its request's index. Leaving early (a client that
    went away) cancels every request."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, handle: RequestHandle) -> None:
        async for out in handle:
            await queue.put((k, out))

    tasks = [asyncio.create_task(pump(k, h)) for k, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            k, out = await queue.get()
            left -= out.finished
            yield k, out
    finally:
        for t in tasks:
            t.cancel()
        for h in handles:
            h.cancel()
