"""The usage ledger contract suite (tests/contract/test_ledger.py), run here on Redis Cluster and
Sentinel through this folder's fixtures."""

from tests.contract.test_ledger import *  # noqa: F403
