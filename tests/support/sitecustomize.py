"""Test support: lets accelerate run FSDP2 on CPU processes (gloo), so the FSDP code path runs in CI.

accelerate only turns ``distributed_type: FSDP`` on for accelerator devices; on a
machine without GPUs it falls back to plain multi-CPU data parallelism. Put this
folder on PYTHONPATH and set GRADSIFT_TEST_CPU_FSDP=1: the state then reports FSDP
and the Trainer shards the model with ``torch.distributed.fsdp.fully_shard`` on the
CPU, as it would on GPUs. Nothing else is changed.
"""

import os

if os.environ.get("GRADSIFT_TEST_CPU_FSDP") == "1":
    import accelerate.state as _state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    _init = _state.AcceleratorState.__init__

    def _cpu_fsdp_init(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
            self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()
            self.distributed_type = DistributedType.FSDP

    _state.AcceleratorState.__init__ = _cpu_fsdp_init
