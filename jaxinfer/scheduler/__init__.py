"""Host-side serving state: sequences, the paged-KV block manager and the continuous-batching scheduler."""

from jaxinfer.scheduler.block_manager import NULL_BLOCK, BlockManager, BlockManagerMetrics
from jaxinfer.scheduler.request import FinishReason, Sequence, SequenceStatus
from jaxinfer.scheduler.scheduler import (ScheduledSequence, Scheduler, SchedulerMetrics,
                                          SchedulerOutput)

__all__ = ["NULL_BLOCK", "BlockManager", "BlockManagerMetrics", "FinishReason", "Sequence",
           "SequenceStatus", "ScheduledSequence", "Scheduler", "SchedulerMetrics", "SchedulerOutput"]
