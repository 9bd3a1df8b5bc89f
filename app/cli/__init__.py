"""The ``lenslab`` command line. Every command reads and writes the same store as the API and
the dashboard (``--store DIR`` or ``$LENSLAB_STORE``; default: the user's cache dir).

Exit codes (``app/cli/exit_codes.py``): 0 done; 1 unexpected error or a failed child process (its
code is passed on); 2 a typed LensLab error or a usage error, printed as one line
(``error: …``); 130 interrupted (Ctrl-C), with one line saying what was kept.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from analysis.errors import ConfigError
from app.cli.options import StoreOpt, console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="LensLab: interpretability and weight-analysis workbench.")
from app.cli.store import store_app  # noqa: E402  (lenslab store ls|rm|check)
app.add_typer(store_app, name="store")
from app.cli.mmoe import register as _register_mmoe  # noqa: E402  (lenslab mmoe ..., lenslab experts)
_register_mmoe(app)
from app.cli.bilinear import bilinear_app  # noqa: E402  (lenslab bilinear train|decompose)
app.add_typer(bilinear_app, name="bilinear")
from app.cli.steer import steer_app  # noqa: E402  (lenslab steer extract|apply|dose|layers|orthogonalize)
app.add_typer(steer_app, name="steer")
from app.cli.steer_search import register as _register_steer_search  # noqa: E402  (lenslab steer search|audit)
_register_steer_search(steer_app)
from app.cli.sae import sae_app  # noqa: E402  (lenslab sae train|eval|features|prompt|export|import|list)
app.add_typer(sae_app, name="sae")
from app.cli.sae_eval import groundtruth as _sae_groundtruth, probe as _sae_probe  # noqa: E402
sae_app.command("groundtruth")(_sae_groundtruth)  # lenslab sae groundtruth | probe: offline SAE evaluation
sae_app.command("probe")(_sae_probe)
from app.cli.sae_transcoder import transcoder as _sae_transcoder  # noqa: E402  (lenslab sae transcoder)
sae_app.command("transcoder")(_sae_transcoder)
from app.cli.sae_transcoder import transcoders as _sae_transcoders  # noqa: E402  (lenslab sae transcoders)
sae_app.command("transcoders")(_sae_transcoders)
from app.cli.sae_saelens import export as _sae_export, import_ as _sae_import  # noqa: E402  (SAELens format)
sae_app.command("export")(_sae_export)
sae_app.command("import")(_sae_import)
from app.cli import weights  # noqa: E402  (lenslab analyze | select | experiment kappatune)
app.command()(weights.analyze)
app.command()(weights.select)
app.add_typer(weights.experiment_app, name="experiment")
from app.cli.circuits import circuits as _circuits  # noqa: E402  (lenslab circuits)
app.command("circuits")(_circuits)
from app.cli.quickstart import quickstart as _quickstart  # noqa: E402  (lenslab quickstart)
app.command("quickstart")(_quickstart)


@app.command()
def dashboard(
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 unless you mean to share it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8501,
    store: StoreOpt = None,
    allowed_root: Annotated[Optional[list[Path]], typer.Option(
        "--allowed-root", help="Directory the dashboard may open typed model paths in (repeatable; default: the "
                               "current dir, LensLab's models dir and the Hugging Face cache).")] = None,
) -> None:
    """Start the Streamlit dashboard on HOST:PORT (127.0.0.1 by default)."""
    _check_port(host, port)  # first: a busy port is reported at once
    from app import api
    from app.allowed_paths import ENV_VAR as ALLOWED_ROOT_VAR
    from app.cli.exit_codes import error

    env = dict(os.environ)
    env["LENSLAB_STORE"] = str(api.open_store(store).root)
    if allowed_root:
        env[ALLOWED_ROOT_VAR] = os.pathsep.join(str(p.expanduser().resolve()) for p in allowed_root)
    script = Path(__file__).resolve().parents[1] / "dashboard.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(script), "--server.address", host,
           "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "viewer", "--client.showErrorDetails", "none"]
    console.print(f"dashboard on http://{host}:{port} (store {env['LENSLAB_STORE']})")
    rc = subprocess.call(cmd, env=env)  # Ctrl-C reaches streamlit too; call() then re-raises it here (exit 130)
    if rc != 0:
        error(f"streamlit exited with code {rc} (its messages are above); the store is unchanged")
        raise typer.Exit(rc)


def _check_port(host: str, port: int) -> None:
    """Raise ConfigError unless a server could listen on HOST:PORT now (checked before streamlit starts,
    which would otherwise fail later or pick another port)."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port; give a number from 1 to 65535 (default 8501)")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} does not resolve ({exc.strerror}); pass an address of this machine, "
                          "e.g. 127.0.0.1") from exc
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a closing socket is no clash
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is already in use; pass --port with a free port (e.g. "
                                  f"--port {port + 1}) or stop the server listening there") from exc
            if exc.errno == errno.EACCES:
                raise ConfigError(f"port {port} on {host} needs privileges ({exc.strerror}); pass --port with a "
                                  "port above 1023") from exc
            # anything else (e.g. an address family this host lacks): streamlit decides, its code is passed on


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the command on ``argv`` (default ``sys.argv[1:]``) and exit
    with its code (``app/cli/exit_codes.py``: 0, 1, 2 for a typed error or usage error, 130 on Ctrl-C)."""
    from app.cli.exit_codes import run

    sys.exit(run(app, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
