"""The one exception type for mistakes a user can make.

Anything a user can get wrong from the command line or a config file (a mesh that does not fit,
a typo in a key, missing data, a checkpoint of another model) raises `UsageError` with one
sentence that says what is wrong and, where possible, how to fix it. The command-line entry points
catch it, print the sentence to stderr and exit with `EXIT_USAGE`, before any compute starts.
"""

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in the user's input, reported as one sentence and exit code 2."""
