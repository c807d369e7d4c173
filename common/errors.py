"""One exception type for every failure the user can cause, shown as one line instead of a traceback."""
import sys


class LabError(Exception):
    """A problem the user can fix (bad toggle, unknown model, empty prompt, ...).

    The message is one sentence that says what is wrong and what to do.
    """


def _one_line_excepthook(exc_type, exc, tb):
    """Print LabError, Ctrl-C and a missing MPS operation as one line; leave real bugs with their traceback."""
    if issubclass(exc_type, LabError):
        print(f"Error: {exc}", file=sys.stderr)
        return  # Python then exits with code 1
    if issubclass(exc_type, NotImplementedError) and "MPS" in str(exc):
        print("Error: an operation this run needs is not implemented on the Mac's GPU (MPS): run again with "
              "PYTORCH_ENABLE_MPS_FALLBACK=1 in front of the command, or with --DEVICE=cpu.", file=sys.stderr)
        return
    if issubclass(exc_type, KeyboardInterrupt):
        print("\nInterrupted: nothing was written for this run.", file=sys.stderr)
        return
    sys.__excepthook__(exc_type, exc, tb)
    print("This is a bug in the lab, not in your settings: please copy the lines above into an issue.",
          file=sys.stderr)


def install_error_handler():  # called by common.config.parse_toggles
    """Make uncaught LabErrors end the program with one readable line (exit code 1)."""
    sys.excepthook = _one_line_excepthook
