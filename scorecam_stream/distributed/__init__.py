"""Ray workers for the masked passes; the only package that imports Ray.

- :mod:`.session`: connect to a cluster or start a local instance; shut it down.
- :mod:`.pool`: an actor pool that knows nothing of frames (start-up, calls, deaths, restarts).
- :mod:`.calls`: the frame protocol's worker calls (classify -> shards -> combine -> score),
  one class per call: what it sends, what its reply does, how it fails.
- :mod:`.explainer`: the explainer over any pool: runs, the call queue, replies, retries.
- :mod:`.cluster`: the explainer over a pool of Ray actors.
"""

from .cluster import RayExplainer
from .explainer import DispatchStats, ShardedExplainer

__all__ = ["DispatchStats", "RayExplainer", "ShardedExplainer"]
