"""The usage ledger contract suite (tests/contract/test_ledger.py), run here on Redis Cluster and
Sentinel through this folder's fixtures (conftest.py). Only its contract tests are taken (those
on the ``ledger`` fixture): its own fixtures would override this folder's."""

import inspect

from tests.contract import test_ledger as suite

globals().update(
    {
        name: test
        for name, test in vars(suite).items()
        if name.startswith("test_") and set(inspect.signature(test).parameters) <= {"ledger", "bad"}
    }
)
