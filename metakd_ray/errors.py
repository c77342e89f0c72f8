"""The one exception type users see: a bad input, reported as a single line and exit code 2."""


class MetaKDError(Exception):
    """A problem with the user's input (config, data, model path) rather than a bug.

    The CLI prints ``error: <message>`` and exits with code 2; the message names the file or
    config key and says what was expected.
    """

    exit_code = 2


def did_you_mean(word: str, choices) -> str:
    """" (did you mean 'x'?)" for the closest of ``choices`` to a mistyped ``word``, else ""."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class RunFailed(MetaKDError):
    """A stage that could not finish (a full disk, training that failed after its retries): one
    ``error:`` line naming the stage and the cause, exit code 1; what was written before stays."""

    exit_code = 1


def cause_line(exc: BaseException) -> str:
    """The innermost ``SomeError: message`` line of an exception (Ray wraps a worker's exception in
    its own, with the worker's traceback in the text), for a one-line report."""
    texts = []
    while exc is not None and len(texts) < 10:
        texts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    import re

    found = [m for text in texts for m in re.findall(r"^\s*(\w+(?:Error|Exception|Failed\w*): .+)$", text, re.M)]
    return (found[-1] if found else texts[0].splitlines()[0]).strip()[:300]
