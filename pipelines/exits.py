"""How a command ends: its exit code, and one line for what the user acts on (`regmix.errors`)."""

import os
import sys
from collections.abc import Callable

from regmix.errors import ServiceError, UserError


def in_one_line(command: Callable[[], int | None], prog: str) -> int:
    """Run `command`; its exit code, or one line for what the user acts on: a mistake in their
    input (exit 2) or a service out of reach (exit 1), never a traceback. The benchmarks that
    take a config use it too (a module of its own: they need not import the CLI's kfp and
    mlflow)."""
    try:
        return command() or 0
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except ServiceError as e:  # a service out of reach: not the user's input, still one line
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `regmix ... | head`: the reader left; say nothing more
        # Python flushes stdout again at exit: point it at nothing so that this stays quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
