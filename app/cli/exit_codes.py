"""Exit codes of the ``lenslab`` command line, and its one-line errors.

``run(app, args)`` runs one command and returns its exit code; ``app.cli.main`` exits with it:

    0    done
    1    an unexpected error (a bug: ``LENSLAB_DEBUG=1`` shows the traceback), or a child
         process (streamlit) failed: the child's own code is passed on
    2    a typed LensLab error (``error: …`` says the value, the constraint and the fix) or a
         usage error (unknown option, missing argument)
    130  interrupted (Ctrl-C), with one line saying what was kept

Every error is printed as one line on stderr (never wrapped), without a traceback.

The command is run through click directly, not through typer's ``main``: in non-standalone
mode typer turns Ctrl-C into a *returned* 130, indistinguishable from a command's return value,
and ``typer.Exit(code)`` likewise, so both were easy to drop.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer
from rich.console import Console
from rich.text import Text

from analysis.errors import LensLabError

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
DEBUG_VAR = "LENSLAB_DEBUG"

# What Ctrl-C leaves behind, by command; None: the command prints its own line (`sae train` names
# the checkpoint it keeps). Every store write is atomic, so no command leaves a partial entry.
INTERRUPTED = {
    "sae train": None,
    "dashboard": "interrupted: dashboard stopped; the store is unchanged",
}
INTERRUPTED_DEFAULT = ("interrupted: nothing partial was stored; results finished before Ctrl-C are kept in the "
                       "store, so running the same command again continues from them")

_stderr = Console(stderr=True)


def say(message: str, *, style: str | None = None, prefix: str = "") -> None:
    """Print ``prefix message`` as one line on stderr (newlines folded, no wrapping, no markup)."""
    text = Text.assemble((prefix, style or ""), " " if prefix else "", " ".join(str(message).split()))
    _stderr.print(text, soft_wrap=True, highlight=False)


def error(message: str) -> None:
    """``error: message`` on one line of stderr."""
    say(message, style="red", prefix="error:")


def _click_exceptions() -> tuple[type[BaseException], ...]:
    """ClickException of the click typer runs on (its vendored copy in typer >= 0.2x, else click)."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def command_path(command, args: list[str]) -> str:
    """The (sub)command names at the start of ``args``, e.g. "sae train" (empty if none)."""
    names = []
    for arg in args:
        sub = getattr(command, "commands", {}).get(arg)
        if sub is None:
            break
        names.append(arg)
        command = sub
    return " ".join(names)


def run(app: typer.Typer, args: list[str], prog_name: str = "lenslab") -> int:
    """Run ``app`` on ``args``; print any error as one line; return the exit code (module docstring)."""
    command = typer.main.get_command(app)
    click_errors = _click_exceptions()
    if not _stderr.is_terminal:  # plain lines off a terminal: no library's redrawn tqdm bars among them
        from app.cli.options import quiet_library_bars

        quiet_library_bars()
    try:
        with command.make_context(prog_name, list(args)) as ctx:
            command.invoke(ctx)
        return 0
    except typer.Exit as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except KeyboardInterrupt:
        note = INTERRUPTED.get(command_path(command, args), INTERRUPTED_DEFAULT)
        if note:
            say(note)
        return EXIT_INTERRUPTED
    except LensLabError as exc:
        error(str(exc))
        return EXIT_USAGE
    except click_errors as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `lenslab` or `lenslab store` alone: the help
            exc.show()
            return EXIT_USAGE
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None and ctx.command_path else ""
        error(f"{exc.format_message()}{hint}")
        return int(getattr(exc, "exit_code", EXIT_USAGE))
    except (typer.Abort, EOFError):
        error("aborted")
        return EXIT_ERROR
    except BrokenPipeError:  # `lenslab store ls | head`: the reader went away; stop quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (so the interpreter's final flush is silent)
        return EXIT_ERROR
    except Exception as exc:
        if os.environ.get(DEBUG_VAR):
            raise
        error(f"unexpected {type(exc).__name__}: {exc} (a bug; run again with {DEBUG_VAR}=1 for the traceback "
              "and report it)")
        return EXIT_ERROR
