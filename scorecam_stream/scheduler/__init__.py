"""Pure scheduling for the distributed explainer: no Ray and no torch, tested without a cluster.

- :mod:`.planning`: a frame's shards (channel ranges of equal work), default shards per frame
  and frames in flight, how many items may wait for output, the Ray actors to start.
- :mod:`.inflight`: the frames in flight (:class:`~.inflight.InflightTracker`, one
  :class:`~.inflight.FrameState` each) and the in-order output (:class:`~.inflight.ReorderBuffer`).
- :mod:`.health`: each worker's :class:`~.health.Slot` (up, restarting, gone), the choice of
  worker, probes of lost ones, and the one retry rule (:class:`~.health.RetryPolicy`).
"""
