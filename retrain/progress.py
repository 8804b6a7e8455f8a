"""The one progress-bar helper: tqdm on stderr, silenced by the caller (``--quiet`` / ``--json``)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn every progress bar of this process on or off (the CLI calls this once)."""
    global _enabled
    _enabled = enabled


def bar(total: int | None = None, desc: str = "", unit: str = "it") -> tqdm:
    """A progress bar on stderr; a disabled one (that still counts) when progress is off."""
    from tqdm import tqdm  # here, not at import: the command line imports this module to start

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not _enabled,
        leave=False,
        dynamic_ncols=True,
    )

