"""The one exception type for bad user input.

The CLI turns a :class:`PrunescopeError` into a single clear message and a non-zero exit code,
without a traceback. Anything else that escapes is a bug and keeps its traceback.
"""


class PrunescopeError(ValueError):
    """Bad input from the user: a missing file, an invalid option, an unknown model.

    The message should name the offending input and say what would be valid.
    """
