"""The sweep config (YAML): read and checked whole, every error naming its key, before any trial starts. The keys
are listed in jobs.sweep's docstring."""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from compress import models, specs
from jobs import auto, export, report

CONFIG_KEYS = {"model", "eval_data", "calib_data", "eval_column", "specs", "grid", "budget", "objective", "seq_len",
               "eval_blocks", "calib_blocks", "speed", "export", "checkpoints"}


@dataclass
class SweepConfig:
    model: str
    specs: list[str]
    budget: dict
    objective: tuple
    kind: str
    eval_data: str | None = None
    calib_data: str | None = None
    eval_column: str = "text"
    seq_len: int = 256
    eval_blocks: int = 8
    calib_blocks: int = 32
    speed: bool = True
    export: list[str] = field(default_factory=list)
    checkpoints: dict[str, str] = field(default_factory=dict)  # row name -> a variant made elsewhere (its folder)
    raw: dict = field(default_factory=dict)


def load_config(path: str | os.PathLike) -> SweepConfig:
    """Read and check a sweep config; every error names the key, before any trial starts."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sweep config {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{str(path)!r}: expected a mapping of keys, got {type(raw).__name__}")
    unknown = set(raw) - CONFIG_KEYS
    if unknown:
        raise ValueError(f"{str(path)!r}: unknown key(s) {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}")
    for key in ("model", "specs"):
        if not raw.get(key):
            raise ValueError(f"{str(path)!r}: key {key!r} is required")
    model = str(raw["model"])
    kind = models.kind_of(model)
    expanded = expand_specs(raw["specs"], raw.get("grid") or {})
    canonical = []
    for s in expanded:
        if s in auto.FAMILIES:
            if not raw.get("budget"):
                raise ValueError(f"{str(path)!r}: specs: {s!r} finds the smallest variant within the budget; "
                                 "give the sweep a budget")
            canonical += [s] if s not in canonical else []
            continue
        try:
            name = str(specs.parse(s))
        except ValueError as e:
            raise ValueError(f"specs: {e}") from None
        if name not in canonical:
            canonical.append(name)
    if "base" not in canonical:
        canonical.insert(0, "base")  # everything is measured against it
    checkpoints = _checkpoints(raw.get("checkpoints") or {}, path)
    canonical += list(checkpoints)  # every row is named: a spec, or a checkpoint's name
    exports = raw.get("export") or []
    exports = [exports] if isinstance(exports, str) else exports
    if not isinstance(exports, list) or not set(exports) <= set(export.FORMATS):
        raise ValueError(f"{str(path)!r}: export {raw.get('export')!r}: expected a list of {list(export.FORMATS)}")
    return SweepConfig(
        model=model, specs=canonical, kind=kind,
        budget=report.check_budget(raw.get("budget") or {}, kind),
        objective=report.check_objective(raw.get("objective", "smallest")), export=exports, checkpoints=checkpoints,
        **{k: raw[k] for k in ("eval_data", "calib_data", "eval_column", "seq_len", "eval_blocks", "calib_blocks",
                               "speed") if k in raw},
        raw=raw,
    )


def _checkpoints(raw, path: Path) -> dict[str, str]:
    """The ``checkpoints`` mapping, checked: names that are not spec strings, folders that exist (made absolute, so
    that trial actors on other working folders find them)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{str(path)!r}: checkpoints: expected a mapping NAME: FOLDER, got {raw!r}")
    out = {}
    for name, folder in raw.items():
        name = str(name)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or _is_spec(name):
            raise ValueError(f"{str(path)!r}: checkpoints: name {name!r} must be letters, digits, '.', '_' or '-' and "
                             "not a spec string (it names the checkpoint's row)")
        if not (Path(str(folder)) / "config.json").exists():
            raise ValueError(f"{str(path)!r}: checkpoints: {name}: {str(folder)!r} is not a model folder (no "
                             "config.json)")
        out[name] = str(Path(str(folder)).resolve())
    return out


def _is_spec(name: str) -> bool:
    if name in auto.FAMILIES:
        return True
    try:
        specs.parse(name)
        return True
    except ValueError:
        return False


def expand_specs(templates: list, grid: dict) -> list[str]:
    """["int4-g{g}"] x {g: [32, 128]} -> ["int4-g32", "int4-g128"]; names without placeholders pass through."""
    if not isinstance(templates, list):
        raise ValueError(f"specs: expected a list of spec strings, got {templates!r}")
    out = []
    for t in templates:
        names = re.findall(r"{(\w+)}", str(t))
        missing = [n for n in names if n not in grid]
        if missing:
            raise ValueError(f"specs: {t!r} uses {missing} but grid has only {sorted(grid)}")
        for values in itertools.product(*(grid[n] for n in names)):
            out.append(str(t).format(**dict(zip(names, values, strict=True))))
    return out
