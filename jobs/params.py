"""A batch row's sampling settings: the columns that carry them (``PARAM_TYPES``, what JSON input is typed as and
what the Batch API's rows hold) and how a row's values, over the job's defaults, become the engine's
``SamplingParams`` (``row_params``), its number of samples (``row_n``) and its tool calls (``row_tools``). CSV cells
come as text, so every reader here takes a value's text as well."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa

from engine.sampling import Guided, SamplingParams, logit_bias_pairs, stop_strings, token_ids_of
from jobs.tools import ToolError, ToolPlan, plan_tools

PARAM_TYPES = {"max_tokens": pa.int64(), "temperature": pa.float64(), "top_p": pa.float64(), "seed": pa.int64(),
               "stop": pa.list_(pa.string()),  # a row's own sampling settings; stop: one string or several
               "json_schema": pa.string(),  # the answer held to this JSON schema (its text; JSON lines: an object)
               "guided_regex": pa.string(), "guided_choice": pa.list_(pa.string()),  # or to a pattern, or choices
               "guided_grammar": pa.string(),  # or to a grammar (EBNF, GBNF's notation)
               "guided_json_object": pa.bool_(),  # or to any JSON object (response_format json_object): one per row
               "presence_penalty": pa.float64(), "frequency_penalty": pa.float64(),
               "repetition_penalty": pa.float64(), "min_tokens": pa.int64(), "top_k": pa.int64(),
               "logit_bias": pa.string(),  # OpenAI's {"token id": bias} (its text; JSON lines: an object)
               "stop_token_ids": pa.list_(pa.int64()), "ignore_eos": pa.bool_(),
               "n": pa.int64(),  # samples of the row's prompt (OpenAI's n): the output's choices column
               "tools": pa.string(),  # OpenAI's tools, [{"type": "function", "function": {...}}] (its text; JSON
               "tool_choice": pa.string(),  # lines: a list); none, auto, required, a function's name or OpenAI's
               "parallel_tool_calls": pa.bool_()}  # {"type": "function", ...}; several calls per answer (default)
PARAM_COLUMNS = tuple(PARAM_TYPES)
MAX_N = 16  # samples per row, as the serving app allows
GUIDED_COLUMNS = {"json_schema": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar", "guided_json_object": "json_object"}  # column -> Guided's kind


def is_null(value) -> bool:
    """An empty cell: None, or NaN (pandas' and CSV's missing value)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def row_params(row: dict, defaults: dict, vocab_size: int) -> SamplingParams:
    """The job's defaults, overridden by the row's own columns (PARAM_COLUMNS); ValueError names a bad value. A row
    that asks for a grammar replaces the job's (--json-schema)."""
    mine = {k: row[k] for k in PARAM_COLUMNS if not is_null(row.get(k))}
    replaced = any(_asks(c, mine[c]) for c in GUIDED_COLUMNS if c in mine)
    values = {k: v for k, v in defaults.items() if k != "chat" and not (replaced and k in GUIDED_COLUMNS)}
    values.update(mine)

    def number(key: str, kind: type, default=None):  # CSV cells come as text: "64" is 64
        value = values.get(key)
        if value is None:
            return default
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"column {key!r}: expected {'an integer' if kind is int else 'a number'}, got "
                             f"{value!r}") from None

    return SamplingParams(max_tokens=number("max_tokens", int), temperature=number("temperature", float),
                          top_p=number("top_p", float), seed=number("seed", int), stop=stop_strings(values.get("stop")),
                          presence_penalty=number("presence_penalty", float, 0.0),
                          frequency_penalty=number("frequency_penalty", float, 0.0),
                          repetition_penalty=number("repetition_penalty", float, 1.0),
                          min_tokens=number("min_tokens", int, 0), top_k=max(number("top_k", int, 0), 0),
                          logit_bias=_logit_bias(values.get("logit_bias"), vocab_size),
                          stop_token_ids=_token_ids(values.get("stop_token_ids"), vocab_size),
                          ignore_eos=_flag(values.get("ignore_eos"), "ignore_eos"), guided=_row_guided(values))


def row_n(row: dict) -> int:
    """The row's number of samples (column ``n``, default 1)."""
    value = row.get("n")
    if is_null(value):
        return 1
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if not 1 <= n <= MAX_N:
        raise ValueError(f"column 'n': expected an integer in 1..{MAX_N}, got {value!r}")
    return n


def row_tools(row: dict, tokenizer) -> ToolPlan | None:
    """The row's tool calls (columns ``tools``, ``tool_choice``, ``parallel_tool_calls``), planned as the chat route
    plans them (jobs.tools); None for a row without tools. A required or named call's grammar replaces the job's
    (--json-schema), as a row's own grammar column does; with a grammar column of the row's own, it is an error."""
    tools, choice = row.get("tools"), row.get("tool_choice")
    try:
        tools = json.loads(tools) if isinstance(tools, str) else tools
        if not is_null(tools) and not (isinstance(tools, list) and all(
                isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
                and isinstance(t["function"].get("name"), str) for t in tools)):
            raise ValueError
    except ValueError:
        raise ValueError(f"column 'tools': expected OpenAI's tools, [{{\"type\": \"function\", \"function\": "
                         f"{{\"name\": ...}}}}, ...], got {row.get('tools')!r}") from None
    if isinstance(choice, str) and choice.lstrip().startswith("{"):
        try:
            choice = json.loads(choice)["function"]["name"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"column 'tool_choice': expected none, auto, required, a function's name or "
                             f'{{"type": "function", "function": {{"name": ...}}}}, got {choice!r}') from None
    try:
        return plan_tools([t["function"] for t in tools or ()], None if is_null(choice) else choice, tokenizer,
                          parallel=_flag(row.get("parallel_tool_calls"), "parallel_tool_calls", default=True),
                          other_grammar=any(_asks(c, row.get(c)) for c in GUIDED_COLUMNS))
    except ToolError as e:  # a row's grammar comes from its columns, not a response_format
        raise ValueError(f"column {'tool_choice' if e.param == 'response_format' else e.param!r}: {e}") from None


def _asks(column: str, value) -> bool:
    """Whether a grammar column's value asks for a grammar (``guided_json_object`` false does not)."""
    return value is not None and (column != "guided_json_object" or _flag(value, column))


def _row_guided(values: dict) -> Guided | None:
    """The grammar a row asks for (GUIDED_COLUMNS), at most one."""
    asked = [c for c in GUIDED_COLUMNS if _asks(c, values.get(c))]
    if len(asked) > 1:
        raise ValueError(f"columns {asked}: ask for one grammar per row")
    if not asked:
        return None
    column, value = asked[0], values[asked[0]]
    try:
        if column == "guided_choice":  # a list; in CSV, a JSON list or one string
            value = json.loads(value) if isinstance(value, str) and value.lstrip().startswith("[") else value
            value = json.dumps([value] if isinstance(value, str) else [str(c) for c in value])
        return Guided(GUIDED_COLUMNS[column], "" if column == "guided_json_object" else value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"column {column!r}: {e}") from None


def _logit_bias(value, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} (in CSV, a JSON object's text) -> (id, bias) pairs, each id a token of the model."""
    if value is None:
        return ()
    try:
        bias = json.loads(value) if isinstance(value, str) else value
        if not isinstance(bias, dict):
            raise TypeError
    except (ValueError, TypeError):
        raise ValueError(f'column \'logit_bias\': expected {{"token id": bias, ...}}, got {value!r}') from None
    try:
        return logit_bias_pairs(bias, vocab_size)
    except ValueError as e:
        raise ValueError(f"column 'logit_bias': {e}") from None


def _token_ids(value, vocab_size: int) -> tuple[int, ...]:
    """stop_token_ids: a list of ids (in CSV, its JSON text or one id)."""
    if value is None:
        return ()
    try:
        ids = json.loads(value) if isinstance(value, str) else value
        ids = [int(t) for t in (ids if isinstance(ids, list | tuple | np.ndarray) else [ids])]
    except (ValueError, TypeError):
        raise ValueError(f"column 'stop_token_ids': expected a list of token ids, got {value!r}") from None
    try:
        return token_ids_of(ids, vocab_size)
    except ValueError as e:
        raise ValueError(f"column 'stop_token_ids': {e}") from None


def _flag(value, name: str, default: bool = False) -> bool:
    """A boolean cell: true or false (in CSV, its text); empty is ``default``."""
    if is_null(value):
        return default
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValueError(f"column {name!r}: expected true or false, got {value!r}")
