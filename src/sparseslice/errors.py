"""The one exception type for mistakes a user can fix.

The CLI prints a :class:`UserError` as a single line and exits with status 2, never with a
traceback. Library callers can catch it like any ``ValueError``.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence


class UserError(ValueError):
    """Bad input: the message names the argument, shows the value and says how to fix it."""


def fail(argument: str, value: object, fix: str, *, problem: str | None = None) -> UserError:
    """Build a :class:`UserError` with the project's message shape.

    Parameters
    ----------
    argument : str
        Name of the argument or file at fault.
    value : object
        The offending value (shown with ``repr`` for strings, ``str`` otherwise).
    fix : str
        What the user should do instead.
    problem : str, optional
        What is wrong; defaults to ``"is invalid"``.

    Examples
    --------
    >>> str(fail("spacing", (1.0, 1.0), "pass the image's spacing", problem="must have 3 values"))
    "spacing must have 3 values, got (1.0, 1.0); pass the image's spacing"
    """
    shown = repr(value) if isinstance(value, str) else str(value)
    return UserError(f"{argument} {problem or 'is invalid'}, got {shown}; {fix}")


def unknown_choice(argument: str, value: object, choices: Sequence[str], *, cutoff: float = 0.6,
                   problem: str | None = None, otherwise: str | None = None, more: str | None = None) -> UserError:
    """Build the :class:`UserError` for a value outside a fixed set of choices.

    The one "did you mean" of the project. The message names the argument, the value, every
    valid choice (or ``problem``) and, when one is close (:func:`difflib.get_close_matches` at
    ``cutoff``; 0 always suggests the nearest), suggests it; else the fix is ``otherwise``
    (default: an example with the first choice). ``more`` is said after the fix, either way.

    Examples
    --------
    >>> str(unknown_choice("--strategy", "randm", ("random", "interval")))
    "--strategy must be one of random, interval, got 'randm'; did you mean 'random'?"
    >>> str(unknown_choice("key 'sed'", "sed", ("seed", "lr"), problem="does not exist", otherwise="valid: seed, lr"))
    "key 'sed' does not exist, got 'sed'; did you mean 'seed'?"
    >>> str(unknown_choice("spec", "sed", ("seeds",), cutoff=0, problem="has an unknown key", more="valid: seeds"))
    "spec has an unknown key, got 'sed'; did you mean 'seeds'? valid: seeds"
    """
    near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=cutoff)
    fix = f"did you mean {near[0]!r}?" if near else otherwise or f"e.g. {argument} {choices[0]}"
    if more:
        fix = f"{fix} {more}"
    return fail(argument, value, fix, problem=problem or f"must be one of {', '.join(map(str, choices))}")
