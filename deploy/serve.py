"""Serve the deployments from this process (no work pool or worker needed):
``python -m deploy.serve`` with ``PREFECT_API_URL`` and the ``BLIS_*`` settings of
``deploy.deployments`` in the environment. ``make serve`` runs it with the local stack."""

from __future__ import annotations

import sys

from deploy.deployments import Settings, build_deployments


def main() -> None:
    from prefect import serve

    from blis_model.errors import ConfigError

    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    serve(*build_deployments(settings), print_starting_message=True)


if __name__ == "__main__":
    main()
