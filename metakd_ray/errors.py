"""The one exception type users see: a bad input, reported as a single line and exit code 2."""


class MetaKDError(Exception):
    """A problem with the user's input (config, data, model path) rather than a bug.

    The CLI prints ``error: <message>`` and exits with code 2; the message names the file or
    config key and says what was expected.
    """

    exit_code = 2
