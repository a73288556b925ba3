"""The usage ledger contract suite (tests/contract/test_ledger.py), run here on Redis Cluster and
Sentinel through this folder's fixtures (conftest.py). Only its tests are taken: its own
fixtures would override this folder's."""

from tests.contract import test_ledger as suite

globals().update({name: test for name, test in vars(suite).items() if name.startswith("test_")})
