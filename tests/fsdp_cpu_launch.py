"""The lt2convert CLI with accelerate switched to FSDP2 on CPU processes (run under `accelerate launch`).

accelerate enables FSDP only for GPU processes: a multi-CPU launch stays data parallel whatever its FSDP options.
Its FSDP2 code itself runs on CPU over gloo, so this switches every Accelerator to FSDP2 (transformer-layer
wrapping, as `accelerate launch --use_fsdp --fsdp_version 2` would configure it) for tests without a GPU.
"""

from __future__ import annotations

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from lt2convert.cli import main

_accelerator_init = accelerate.Accelerator.__init__


def _fsdp2_init(self, *args, **kwargs) -> None:
    _accelerator_init(self, *args, **kwargs)
    self.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    for state in (self.state, PartialState()):
        state.distributed_type = DistributedType.FSDP


accelerate.Accelerator.__init__ = _fsdp2_init

if __name__ == "__main__":
    main()
