"""Small things the HTTP adapters share: a secret no repr shows, one-line details, the User-Agent."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


class Secret:
    """A string that no repr shows."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"


def one_line(text: str, limit: int) -> str:
    """Collapse whitespace and cut ``text`` to ``limit`` characters, for an operator-facing detail."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _user_agent() -> str:
    try:
        return f"ctsync/{version('ctsync')}"
    except PackageNotFoundError:
        return "ctsync/unknown"


USER_AGENT = _user_agent()
