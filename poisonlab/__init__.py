"""poisonlab: a testbed for data poisoning and backdoors in language models."""

__version__ = "0.1.0"


class PoisonlabError(Exception):
    """A user-facing error: one line that names the offending key, file or value.

    The command line prints it without a traceback and exits non-zero.
    """
