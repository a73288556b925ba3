"""The store contract suite (tests/contract/test_store_contract.py), run here on Redis Cluster
and Sentinel through this folder's ``store_env``."""

from tests.contract.test_store_contract import *  # noqa: F403
