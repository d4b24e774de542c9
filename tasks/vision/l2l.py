"""Import learn2learn without the notice its ``gym`` dependency prints.

learn2learn 0.2.0 imports ``gym`` 0.26, which prints a notice to stderr that gym is unmaintained; this
library uses gymnasium and cannot act on it, nor can its users. Everything else learn2learn or gym
writes to stderr while importing is passed on.
"""

from __future__ import annotations

import contextlib
import io
import sys
from types import ModuleType

__all__ = ["import_learn2learn"]


def import_learn2learn() -> ModuleType:
    """``import learn2learn``, with gym's import-time notice dropped."""
    if "learn2learn" in sys.modules:
        return sys.modules["learn2learn"]
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            import learn2learn
    finally:
        text = captured.getvalue()
        try:
            from gym_notices.notices import notices

            for notice in notices.values():
                text = text.replace(notice + "\n", "")
        except ImportError:
            pass
        sys.stderr.write(text)
    return learn2learn
