"""The one error type users see.

Library code raises :class:`HalluError` for anything the user can fix (a bad file, a wrong option, a
busy stage). The CLI prints its message as one red line and exits with code 2; any other exception is
a bug and keeps its traceback.
"""


class HalluError(Exception):
    """A user-facing error: the message names the file/record and what is wrong, on one line."""

    exit_code = 2

    def __init__(self, message: str):
        # One line, always: multi-line messages break the "one clear line" contract of the CLI.
        super().__init__(" ".join(str(message).split()))


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and ``kill`` send), raised where Ctrl-C would be.

    It is a KeyboardInterrupt so every stage stops the way it does on Ctrl-C: outputs flushed, the
    manifest saying "interrupted", a rerun resuming. The CLI exits 143 (128 + SIGTERM) for it.
    """

    exit_code = 143
