"""Offline jobs on a Ray cluster: an actor pool of Conveyor engines, fed by a
Ray Data dataset (`processor.build_processor`) or by a batch file that the
driver reads and writes (`ray_batch.run_ray_batch`, `conveyor batch --ray`).
Ray is an optional dependency: `pip install "conveyor[ray]"`."""

from engine.entrypoints.ray.processor import build_processor  # noqa: E402

__all__ = ["build_processor"]
