"""The one exception type that the CLI turns into a clear, traceback-free message."""


class ConceptCapsError(Exception):
    """Bad input or a missing artifact.

    The message names the file, field or value at fault and says how to fix it; the CLI
    prints it alone and exits with status 2.
    """
