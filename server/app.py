"""The ServerApp: a thin Flower adapter around :mod:`server.federation`.

``flwr run .`` builds the configuration from ``[tool.flwr.app.config]`` (plus
``--run-config`` overrides); ``sim/run.py`` builds the same object from its options and
uses :func:`server_app_for`. Both then run :func:`server.federation.federate`.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage events leave a hospital by default

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from common.config import RunConfig  # noqa: E402
from common.logs import log_to_file, setup_logging  # noqa: E402

from .federation import ServerRun, federate, setup  # noqa: E402

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = dict(context.run_config)
    resume = str(settings.pop("resume", ""))
    settings.pop("verbose", None)
    cfg = RunConfig.from_dict(settings)
    setup_logging()
    sr = setup(cfg, resume=resume, progress=False)
    log_to_file(sr.run.path / "log.txt")
    federate(grid, sr)


def server_app_for(sr: ServerRun) -> ServerApp:
    """A ServerApp bound to an already prepared run (used by ``sim/run.py``)."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        federate(grid, sr)

    return bound
