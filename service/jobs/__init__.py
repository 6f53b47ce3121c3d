"""Durable personalization jobs: the runner that takes a Personalize request to a registered adapter.

- requests: a request resolved into fixed training parameters (token, seed, method defaults)
- runner:   JobRunner (bounded queue, per-tenant limit, workers, checkpoints, cancel, restart)

The training itself is service.personalize, run where the backend runs the model.
"""

from .runner import JobRunner, NameTaken, QueueFull, adapter_id_for

__all__ = ["JobRunner", "NameTaken", "QueueFull", "adapter_id_for"]
