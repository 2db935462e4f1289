"""The one error class that `attnx.main` and `attnx.sweep` print as a single line."""


class RunError(Exception):
    """A problem with a run that its user can fix (a path, a lock, a checkpoint, a disk).

    The message names what is wrong (the file, path, key or process) and, where
    it helps, what to do; the command line prints it as `FATAL <message>` with no
    traceback, because the traceback would only bury it.
    """
