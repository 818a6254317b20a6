"""The one exception type for problems with the user's input."""


class SynthaugError(Exception):
    """Bad input: a missing file, an unknown name, an impossible split, a config key that does
    not exist. The message names the problem and the fix in one line; the command line prints
    it without a traceback and exits with status 2."""
