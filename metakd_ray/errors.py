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
