"""The one way the jobs connect to Ray: the cluster ``RAY_ADDRESS`` names (``ray job submit`` sets
it, or a user does), else a local Ray for this command alone, without its dashboard, its node
registered as 127.0.0.1 (README "Security" says what still listens beyond the loopback)."""
from __future__ import annotations

import logging
import os


def connect(num_cpus: int | None = None, runtime_env: dict | None = None, address: str | None = None) -> None:
    """``ray.init`` once per process. ``num_cpus`` sizes a local Ray (at least this machine's cores);
    it is ignored on a cluster, whose nodes declare their own."""
    import ray  # RAY

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        return
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_cpus or 0), include_dashboard=False,
             runtime_env=runtime_env, logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
