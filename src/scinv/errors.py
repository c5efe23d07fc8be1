"""One exception type for problems the user can fix, reported as a single line."""


def first_line(err: Exception) -> str:
    """The first line of an exception's message (its type when empty), for one-line errors; a
    bytes-like message from a C extension (b'...') loses its quoting."""
    text = str(err).strip().strip("b'\"") or type(err).__name__
    return text.splitlines()[0][:160]


class ScinvInputError(ValueError):
    """Bad user input: the message names the file or column and says how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
