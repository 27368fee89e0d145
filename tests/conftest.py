"""Shared pytest fixtures; the S3 server fixtures live in ``tests/s3_server.py``."""

from flow_services import local_ray, prefect_api  # noqa: F401  (Prefect + Ray fixtures)
from s3_server import s3_env, s3_server  # noqa: F401  (registers the fixtures)
