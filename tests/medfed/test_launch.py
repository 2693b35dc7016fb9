"""How medfed starts Flower's simulation engine."""

from __future__ import annotations

import threading

from flwr.server.superlink.fleet.vce import vce_api

from medfed.launch import _workers_for


def test_every_site_gets_a_simulation_worker_at_once():
    # Flower's engine runs its per-actor workers in `vce_api.ThreadPoolExecutor()`; each
    # loops until the run ends, so a worker that never starts leaves its site waiting.
    sites = 12
    barrier = threading.Barrier(sites, timeout=10)
    default = vce_api.ThreadPoolExecutor
    with _workers_for(sites):
        with vce_api.ThreadPoolExecutor() as pool:
            arrived = [pool.submit(barrier.wait) for _ in range(sites)]
        assert sorted(f.result() for f in arrived) == list(range(sites))
    assert vce_api.ThreadPoolExecutor is default
