"""The fault suite's rig, load and judge (issue 13, "A fault suite"): the front door.

Real processes, real Redis, in three modules a scenario imports through this one:

- rig.py: ``rig()`` starts a private redis-server (``PausableRedis``: its own port,
  SIGSTOP-able, killable), the simulator in a process of its own (the judge's witness, with the
  fault hook of ``gateway/sim/app.py``; ``python -m tests.faults.rig``), and three gateway
  processes on them with short windows and small limits.
- load.py: ``Load`` offers a mixed load through them (REST GETs, LLM chat, uploads, transcript
  jobs submitted and polled to their end, streaming sessions), and can play the vanishing
  client (uploads cut mid-body, waiters that hang up, sessions dropped without Terminate).
- judge.py: ``judge()`` is the one invariant checker every scenario runs once its load has
  stopped and a lease life has passed:

1. every gateway process is alive (but one the scenario killed) and ``/healthz`` answers; no
   background task restarted;
2. every non-2xx answer is JSON ``{"error": str}`` (or the LLM Gateway's own error shape,
   passed through from upstream); no request went unanswered but those sent to an instance
   the scenario killed or froze, or answers upstream cut short (the sim says how many);
3. every transcript job a client was told exists ran upstream exactly once and ended as its
   audio said (or, where the scenario says so, is at least still findable);
4. the store holds no lease, reservation, waiting ticket or unfinished job (``inspect_store``
   of tests/test_soak.py);
5. the usage ledger charged nothing for work that never ran upstream: its LLM tokens, its
   transcripts and audio seconds and its streaming sessions are at most (where the scenario
   promises exactness: exactly) what the simulator billed;
6. every upstream streaming session ended with Terminate (but those relayed by an instance
   the scenario killed: nobody is left to send it; upstream's inactivity timeout ends them);
7. upstream saw no limit violation.
"""

from tests.faults.judge import Verdict, explain, judge
from tests.faults.load import Job, Load, Rates
from tests.faults.rig import Rig, rig

__all__ = ["Job", "Load", "Rates", "Rig", "Verdict", "explain", "judge", "rig"]
