"""Default folders under the home folder (``~/.cache/pipeline/...``), each overridden by an environment variable.

A service account often has no home folder: HOME unset and a passwd entry of ``/nonexistent``, or HOME pointing at
a folder that is gone. Creating ``~/.cache/pipeline`` there would make a stray ``/nonexistent/...`` tree (or fail
with a confusing permission error), so the default is refused with one line naming the variable to set."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


class HomeMissing(UserError, RuntimeError):
    """A default folder under the home folder was needed, and there is no home folder."""


def home_folder() -> Path | None:
    """The home folder if it exists (HOME, else the passwd entry), else None."""
    if "HOME" in os.environ and not os.environ["HOME"].strip():
        return None
    try:
        home = Path.home()
    except (RuntimeError, KeyError):     # HOME unset and no passwd entry for this uid
        return None
    return home if home.is_absolute() and home.is_dir() else None


def _home_text() -> str:
    home = os.environ.get("HOME")
    if home is None:
        try:
            return str(Path.home())
        except (RuntimeError, KeyError):
            return "(none: HOME is unset and this user has no passwd entry)"
    return home if home.strip() else "(none: HOME is empty)"


def home_cache(env: str, *parts: str, what: str, hint: str = "a folder") -> Path:
    """``$env`` when set, else ``~/.cache/pipeline/<parts>``. No home folder: HomeMissing naming ``env``.
    ``what``: the folder's purpose for the message (e.g. "CIFAR-10 folder"); ``hint``: what ``env`` should hold."""
    value = os.environ.get(env, "").strip()
    if value:
        return Path(value).expanduser()
    home = home_folder()
    if home is None:
        default = "/".join(("~/.cache/pipeline", *parts))
        raise HomeMissing(f"the home folder {_home_text()} does not exist, so there is no default {what} "
                          f"({default}); set ${env} to {hint}")
    return home / ".cache" / "pipeline" / Path(*parts)
