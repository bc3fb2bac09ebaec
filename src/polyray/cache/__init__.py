"""Two-tier result cache: keys, compact values, an in-process tier, a Redis tier, and a tuner that
sizes the local tier from a sample of the request stream. In-flight dedup lives in the engine
(reference-counted queue entries), where the compute of a shared entry is also split.

Layer rule (DESIGN.md): plain dataclasses only, no FastAPI, no pydantic, no HTTP codes.

Wiring, per served model version::

    key = cache_key(ref, normalization, text)
    tuner.observe(ref, key, now_s)                 # every key, hit or miss
    found = await tiered.get_many(keys)            # local -> shared
    ... misses: one queued entry per key, joined by identical requests (engine) ...
    await tiered.put_many(keys, vectors)
    decisions = tuner.retune(now_s)                # every retune_interval_s, off the event loop
    local.reconfigure(...from decisions[ref]...)
"""
