"""ragrpo: GRPO-tune a small language model with reward functions, then answer over a LanceDB table.

The library is the product; `ragrpo.cli` is a thin command line over it. Heavy imports (torch,
transformers, trl, lancedb) happen inside the functions that need them, so importing this package
and running `ragrpo --help` stay instant.
"""

import os
from pathlib import Path

__version__ = "0.1.0"


class RagrpoError(Exception):
    """A problem the user can fix (bad path, column, filter, reward, config).

    The CLI prints its message as one line and exits with code 2; the message names the input
    and, where there is one, the fix.
    """


def cache_dir() -> Path:
    """$RAGRPO_CACHE, else $XDG_CACHE_HOME/ragrpo, else ~/.cache/ragrpo."""
    if os.environ.get("RAGRPO_CACHE"):
        return Path(os.environ["RAGRPO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ragrpo"


from ragrpo import hardware as _hardware  # stdlib only at import: ragrpo stays instant to import

_hardware.limit_onednn_cache()  # before anything runs a oneDNN primitive (hardware.ONEDNN_CACHE)
