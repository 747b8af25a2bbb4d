"""Folders written whole: built in a temporary folder beside their destination, then moved into place, so that a
crash never leaves a half-written model, artifact or choice where a reader looks.

    with new_folder(Path("artifacts/int8")) as tmp:
        ...write files into tmp...
    # artifacts/int8 is now the finished folder; an error inside the block leaves the old one (or none)
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SET_ASIDE = ".old-"  # a folder moved aside while a new one replaces it: .NAME.old-XXXX


@contextmanager
def new_folder(dest: Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; when the block ends, it becomes ``dest``.

    With ``replace``, an existing ``dest`` is moved aside, the new folder moved in, and the old one deleted (put back
    if the second move fails; a process killed between the two moves leaves it at ``.NAME.old-XXXX``, which
    ``compress.locate`` points out). Without it, the first writer wins: when ``dest`` appeared meanwhile (another
    process wrote it), the new folder is discarded. An error in the block discards the new folder.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if not dest.exists():
            os.rename(tmp, dest)
        elif replace:
            old = dest.parent / f".{dest.name}{SET_ASIDE}{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
            try:
                os.rename(tmp, dest)
            except BaseException:
                os.rename(old, dest)  # the previous folder goes back
                raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
