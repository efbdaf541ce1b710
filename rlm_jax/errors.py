"""The project's one error base: bad input (a config value, a file, a checkpoint) that the
user can fix. `str(err)` is always one line naming the culprit; entry points print it as
`error: ...` and exit with status 2 (`configlib.run_main`)."""


class Error(ValueError):
  """Bad input. `str(err)` is one line (whitespace in the message is collapsed)."""

  def __init__(self, message: str):
    super().__init__(' '.join(str(message).split()))
