"""Checks of command-line values where they enter, and a parser that says no in one line.

Every numeric and path option is declared with a :class:`Check` as its argparse ``type=``. A check
converts the text, or raises :class:`argparse.ArgumentTypeError` naming the value and what is
allowed; its :attr:`Check.allowed` is also what ``--help`` shows after the option's help
(:class:`HelpFormatter`), so the range is written once. Finite numbers are meant everywhere: nan
and inf are refused.

:class:`Parser` is the ``ArgumentParser`` of every ``windtunnel`` command: a mistake is one line on
stderr, ``windtunnel <cmd>: error: <what>; see windtunnel <cmd> --help``, and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class Check(Generic[T]):
    """An argparse ``type=``: text → value, or :class:`argparse.ArgumentTypeError` saying what
    was given and what is allowed (:attr:`allowed`, also shown by ``--help``)."""

    def __init__(
        self,
        convert: Callable[[str], T],
        allowed: str,
        ok: Callable[[T], str] = lambda value: "",
        hint: str = "",
    ) -> None:
        self.convert = convert
        self.allowed = allowed
        """What the option takes, in words: ``a number in (0, 1]``."""
        self.ok = ok
        """The value's problem in words ('' when it is fine)."""
        self.hint = hint
        """How to fix it, beyond giving an allowed value ('' when nothing more to say)."""
        self.__name__ = allowed  # argparse names a type by its __name__ in some messages

    def __call__(self, text: str) -> T:
        try:
            value = self.convert(text)
        except (TypeError, ValueError, OverflowError) as e:
            self.refuse(text, str(e) if isinstance(e, ArgumentProblem) else "is not valid")
        problem = self.ok(value)
        if problem:
            self.refuse(text, problem)
        return value

    def refuse(self, text: str, problem: str) -> NoReturn:
        hint = f" ({self.hint})" if self.hint else ""
        raise argparse.ArgumentTypeError(f"{text!r} {problem}; give {self.allowed}{hint}")

    def hinted(self, hint: str) -> Check[T]:
        """The same check, its refusals ending with ``hint`` (how to get a good value)."""
        return Check(self.convert, self.allowed, self.ok, hint)

    def __repr__(self) -> str:
        return f"Check({self.allowed!r})"


class ArgumentProblem(ValueError):
    """Raised by a converter with its own words for what is wrong (``is not a file``)."""


# -- numbers -------------------------------------------------------------------------------------


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ArgumentProblem("is not a number") from None
    if not math.isfinite(value):
        raise ArgumentProblem("is not a finite number")
    return value


def _whole(text: str) -> int:
    """2000, 2_000 or 2e3 (a float that is a whole number)."""
    try:
        return int(text)
    except ValueError:
        value = _finite(text)
        if not value.is_integer():
            raise ArgumentProblem("is not a whole number") from None
        return int(value)


def _fmt(x: float) -> str:
    return f"{x:g}"


def in_range(
    lo: float | None = None,
    hi: float | None = None,
    *,
    open_lo: bool = False,
    open_hi: bool = False,
    kind: type = float,
) -> Check[Any]:
    """A finite number (``kind=int``: a whole number) within ``[lo, hi]``; ``open_lo`` /
    ``open_hi`` leave an end out; ``None``: no bound on that side."""
    noun = "a whole number" if kind is int else "a number"
    if lo is not None and hi is not None:
        allowed = (
            f"{noun} in {'(' if open_lo else '['}{_fmt(lo)}, {_fmt(hi)}{')' if open_hi else ']'}"
        )
    elif lo is not None:
        allowed = f"{noun} {'>' if open_lo else '≥'} {_fmt(lo)}"
    elif hi is not None:
        allowed = f"{noun} {'<' if open_hi else '≤'} {_fmt(hi)}"
    else:
        allowed = f"a finite {noun.removeprefix('a ')}"

    def ok(value: float) -> str:
        below = lo is not None and (value <= lo if open_lo else value < lo)
        above = hi is not None and (value >= hi if open_hi else value > hi)
        return "is out of range" if below or above else ""

    return Check(_whole if kind is int else _finite, allowed, ok)


def positive(kind: type = float) -> Check[Any]:
    """A finite number > 0 (``kind=int``: a whole number ≥ 1)."""
    return in_range(1, kind=int) if kind is int else in_range(0, open_lo=True)


def count(min: int = 1, max: int | None = None) -> Check[int]:
    """A whole number ≥ ``min`` (and ≤ ``max``); ``2e3`` is read as 2000."""
    return in_range(min, max, kind=int)


def fraction(*, closed_hi: bool = False) -> Check[float]:
    """A number in (0, 1), or (0, 1] with ``closed_hi``: a probability mass, an MFU."""
    return in_range(0, 1, open_lo=True, open_hi=not closed_hi)


def numbers(
    items: Check[Any] | Sequence[Check[Any]], *, names: Sequence[str] = ()
) -> Check[list[Any]]:
    """A comma-separated list: ``names`` fix its length (``K,GAMMA``, one check per name in
    ``items`` or one for all), else one or more values, each checked by ``items``."""
    checks = list(items) if isinstance(items, Sequence) else [items] * max(1, len(names))
    if names:
        each = ", ".join(f"{n} {c.allowed}" for n, c in zip(names, checks))
        allowed = f"{','.join(names)}: {each}"
    else:
        allowed = f"comma-separated values, each {checks[0].allowed}"

    def convert(text: str) -> list[Any]:
        parts = [p.strip() for p in text.split(",")]
        if names and len(parts) != len(names):
            raise ArgumentProblem(f"has {len(parts)} value(s), not {len(names)}")
        if not all(parts):
            raise ArgumentProblem("has an empty value")
        out = []
        for i, part in enumerate(parts):
            check = checks[i] if names else checks[0]
            try:
                out.append(check(part))
            except argparse.ArgumentTypeError:
                what = f"{names[i]} = {part}" if names else part
                raise ArgumentProblem(f"has {what}, which is not {check.allowed}") from None
        return out

    return Check(convert, allowed)


# -- paths ---------------------------------------------------------------------------------------


def _exists(kind: str) -> Callable[[str], Path]:
    def convert(text: str) -> Path:
        p = Path(text).expanduser()
        if not text or not p.exists():
            raise ArgumentProblem("does not exist")
        if kind == "file" and p.is_dir():
            raise ArgumentProblem("is a folder, not a file")
        if kind == "folder" and not p.is_dir():
            raise ArgumentProblem("is not a folder")
        if not os.access(p, os.R_OK):
            raise ArgumentProblem("cannot be read (permission denied)")
        return p

    return convert


existing_file: Check[Path] = Check(_exists("file"), "an existing file")
existing_dir: Check[Path] = Check(_exists("folder"), "an existing folder")
existing_path: Check[Path] = Check(_exists("path"), "an existing file or folder")


def _writable(kind: str) -> Callable[[str], Path]:
    def convert(text: str) -> Path:
        p = Path(text).expanduser()
        if not text:
            raise ArgumentProblem("is empty")
        if kind == "folder" and p.exists() and not p.is_dir():
            raise ArgumentProblem("is a file, not a folder")
        if kind == "file" and p.is_dir():
            raise ArgumentProblem("is a folder, not a file")
        parent = next((a for a in (p, *p.parents) if a.exists()), Path("."))
        if not parent.is_dir():
            raise ArgumentProblem(f"is under {parent}, which is a file")
        if not os.access(parent, os.W_OK):
            raise ArgumentProblem(f"cannot be written ({parent} is not writable)")
        return p

    return convert


out_dir: Check[Path] = Check(_writable("folder"), "a folder to write (created if missing)")
out_file: Check[Path] = Check(_writable("file"), "a file to write (its folder is created)")


def uri(text: str) -> str:
    """A tracking URI (empty: the default). A server is ``http(s)://HOST:PORT``; a store is
    ``sqlite:///FILE``, ``file:PATH`` or a folder. ``HOST:PORT`` alone (no scheme) is refused."""
    if re.match(r"^[\w.-]+:\d+/?$", text):
        raise ArgumentProblem(f"has no scheme (a server is http://{text})")
    if re.search(r"\s", text) or re.match(r"^https?://(:|/|$)", text):
        raise ArgumentProblem("is not a URI")
    return text


tracking_uri: Check[str] = Check(uri, "http(s)://HOST:PORT, sqlite:///FILE, file:PATH or a folder")


# -- the parser ----------------------------------------------------------------------------------


class _Allowed(argparse.HelpFormatter):
    """Each option's help ends with what its :class:`Check` allows (one source of truth)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        allowed = getattr(action.type, "allowed", None)
        if allowed and action.help != argparse.SUPPRESS:
            text = f"{text} [{allowed}]".strip()
        return text


class HelpFormatter(_Allowed, argparse.RawDescriptionHelpFormatter):
    """Description and epilog as written (examples keep their lines); allowed values shown."""


class WrappingHelpFormatter(_Allowed):
    """Description wrapped to the terminal; allowed values shown."""


NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)
"""A negative number as an argument (``--budget -1e21``), not an option: argparse's own pattern
misses exponents and inf, and then says 'expected one argument' instead of naming the value."""


def one_line(text: str) -> str:
    """A message of several lines as one: lines joined by '; ', indented list items by ', '."""
    out = ""
    for raw in str(text).splitlines():
        line = raw.strip()
        if not line:
            continue
        if not out:
            out = line
        elif out.endswith(":"):
            out += " " + line
        elif raw[:1].isspace():
            out += ", " + line
        else:
            out += "; " + line
    return out


class Parser(argparse.ArgumentParser):
    """``error()`` prints one line, ``<prog>: error: <what>; see <prog> --help``, exits 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NUMBER
        self.commands: dict[str, argparse.ArgumentParser] = {}
        """Its subcommands' parsers, by name (set by the caller of ``add_subparsers``)."""

    def error(self, message: str) -> NoReturn:
        say(f"{self.prog}: error: {one_line(message)}; see {self.prog} --help")
        sys.exit(EXIT_USER_ERROR)


def say(line: str) -> None:
    """One line on stderr."""
    print(line, file=sys.stderr, flush=True)
