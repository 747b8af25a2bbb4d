"""A job's typed ``main(...)`` is its command line: each keyword argument becomes a flag, each default is written
once, and the docstring's ``Args:`` lines become the help."""

from __future__ import annotations

import argparse
import inspect
import logging
import re
import sys
import types
import typing
from collections.abc import Callable


def run(main: Callable, argv: list[str] | None = None):
    """Parse ``argv`` into ``main``'s keyword arguments, call it, and exit with its return code (if an int)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    parser = build_parser(main)
    args = vars(parser.parse_args(argv))
    try:
        code = main(**args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def build_parser(main: Callable) -> argparse.ArgumentParser:
    doc = inspect.getdoc(main) or ""
    summary, arg_help = _parse_doc(doc)
    module = sys.modules[main.__module__]
    module_doc = inspect.getdoc(module) or ""
    spec = getattr(module, "__spec__", None)
    parser = argparse.ArgumentParser(
        prog=f"python -m {spec.name if spec else main.__module__}",
        description=summary,
        epilog=module_doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(main)
    for name, param in inspect.signature(main).parameters.items():
        hint = hints.get(name, str)
        flag = "--" + name.replace("_", "-")
        help_text = arg_help.get(name, "")
        positional = param.default is inspect.Parameter.empty and param.kind == param.POSITIONAL_OR_KEYWORD
        base, is_list = _base_type(hint)
        kwargs: dict = {"help": help_text}
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=param.default, **kwargs)
            continue
        kwargs["type"] = base
        if is_list:
            kwargs["nargs"] = "+"
        if positional:
            parser.add_argument(name, **kwargs)
        elif param.default is inspect.Parameter.empty:
            parser.add_argument(flag, required=True, dest=name, **kwargs)
        else:
            kwargs["help"] = f"{help_text} (default: {param.default})".strip()
            parser.add_argument(flag, default=param.default, dest=name, **kwargs)
    return parser


def _base_type(hint) -> tuple[type, bool]:
    """int | None -> (int, False); list[str] -> (str, True)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return typing.get_args(hint)[0], True
    return hint, False


def _parse_doc(doc: str) -> tuple[str, dict[str, str]]:
    summary = doc.split("\n\n")[0]
    arg_help: dict[str, str] = {}
    if "Args:" in doc:
        current = None
        for line in doc.split("Args:", 1)[1].splitlines():
            m = re.match(r"\s*(\w+):\s*(.*)", line)
            if m and (line.startswith("    ") or not line.startswith(" ")) and not line.startswith("        "):
                current = m[1]
                arg_help[current] = m[2]
            elif current and line.strip():
                arg_help[current] += " " + line.strip()
    return summary, arg_help
