"""The one exception type minadept raises for bad input; the CLI prints it as one line."""


class MinadeptError(Exception):
    """Bad input (model files, prompt, settings). The message names the problem in one line."""
