"""Scheduling policy, pure Python: who runs each step and with how many tokens."""

from scheduler.scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SchedulerOutput
from scheduler.sequence import FinishReason, Sequence, SequenceStatus

__all__ = ["Scheduler", "SchedulerConfig", "SchedulerOutput", "ScheduledChunk", "Sequence",
           "SequenceStatus", "FinishReason"]
