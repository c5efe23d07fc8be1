"""One exception type for problems the user can fix, reported as a single line."""


class ScinvInputError(ValueError):
    """Bad user input: the message names the file or column and says how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
