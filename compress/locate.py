"""Where a model name points: a built-in's folder, a local folder, or a hub id's cached snapshot; and what to say
when a folder is missing because a save was interrupted while replacing it.
"""

from __future__ import annotations

import os
from pathlib import Path

from compress.builtin import BUILTINS, builtin_path
from compress.files import SET_ASIDE


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The local folder behind a built-in name, a path, or a (cached) hub id."""
    name = str(name_or_path)
    if name in BUILTINS:
        return builtin_path(name)
    if Path(name).expanduser().exists():
        return Path(name).expanduser()
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        if Path(name).parent.is_dir():  # "artifacts/chosen" where ./artifacts exists: a local path was meant
            raise FileNotFoundError(f"no such folder {name!r} (its parent {str(Path(name).parent)!r} is a folder "
                                    "here, so this is read as a local path, not a hub id). Check the path.")
        return hub_path(name)
    interrupted = interrupted_save(Path(name).expanduser())
    if interrupted:
        raise FileNotFoundError(interrupted)
    raise FileNotFoundError(f"model {name!r} is neither a built-in ({', '.join(BUILTINS)}) nor an existing folder "
                            "nor a hub id 'org/name'. Check the spelling or the path.")


def interrupted_save(path: Path) -> str | None:
    """Where ``path`` is missing because a save was killed while replacing the artifact there, what to do about it.

    compress.artifact writes a new artifact beside the old one, moves the old one aside (``.NAME.old-XXXX``), moves
    the new one in, then deletes the old: a process killed between the two moves leaves only the old one, aside."""
    aside = sorted(path.parent.glob(f".{path.name}{SET_ASIDE}*")) if not path.exists() else []
    if not aside:
        return None
    return (f"{str(path)!r} is missing: a save was interrupted while replacing it, and the previous artifact is in "
            f"{str(aside[-1])!r}; rename that back to {path.name!r}")



def hub_path(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id, local_files_only=offline))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"no such folder {repo_id!r}, and as a hub id it is not in the local Hugging Face cache while the hub "
            "is unreachable "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}). Download it on a machine that is online "
            "and pass its folder, or use a built-in: " + ", ".join(BUILTINS)
        ) from e
