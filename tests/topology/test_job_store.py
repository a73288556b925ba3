"""The job store contract suite (tests/contract/test_job_store.py), run here on Redis Cluster and
Sentinel through this folder's fixtures."""

from tests.contract.test_job_store import *  # noqa: F403
