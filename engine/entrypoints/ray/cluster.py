"""Connecting to Ray and sizing an engine actor from the platform."""

from __future__ import annotations

from typing import Any

from engine.errors import ConveyorError


def import_ray():
    """The `ray` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConveyorError('Ray is not installed: pip install "conveyor[ray]"') from None
    return ray


def connect(address: str | None) -> Any:
    """Join the cluster at `address`; "auto" (or None) joins the one that
    `ray start` started on this machine (or RAY_ADDRESS names) or, when there
    is none, starts a local Ray. A no-op when already connected."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address in (None, "auto"):
        # Not Ray's own "auto", which joins any Ray it finds running here, even
        # another program's short-lived one (a test's), and dies with it.
        ray.init(log_to_driver=False, include_dashboard=False)
        return ray
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as exc:
        raise ConveyorError(f"no Ray cluster at {address}: {exc}") from None
    return ray


def actor_resources(cpus_per_worker: int = 1) -> dict[str, Any]:
    """Ray resources of one engine actor: a GPU when the engine would run on
    one here, else `cpus_per_worker` CPUs. The actor itself runs its kernels
    and BLAS on that many threads (EngineWorker); a runtime_env setting
    thread variables instead made Ray start every actor seconds later (a
    worker process of its own, set up by Ray's runtime-env agent)."""
    from engine.platform import current_platform

    if current_platform().name in ("cuda", "metal"):
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": cpus_per_worker}
