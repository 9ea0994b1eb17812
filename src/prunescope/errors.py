"""The one exception type for bad user input.

The CLI turns a :class:`PrunescopeError` into a single clear message and a non-zero exit code,
without a traceback. Anything else that escapes is a bug and keeps its traceback.
"""


class PrunescopeError(ValueError):
    """Bad input from the user: a missing file, an invalid option, an unknown model.

    The message should name the offending input and say what would be valid.
    """


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (another library's, often long), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def joined_lines(exc: BaseException) -> str:
    """All of ``exc``'s message on one line (each line stripped), or its type's name: an error
    message is one line on the terminal."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
