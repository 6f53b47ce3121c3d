"""One lock for building torch modules in a process where several threads load models.

diffusers' and transformers' `from_pretrained` patch process-wide functions while they run:
diffusers' `no_init_weights` replaces torch.nn.init's functions with no-ops, and (low_cpu_mem_usage,
its default) accelerate's `init_empty_weights` replaces `nn.Module.register_parameter`, so every
parameter any thread registers meanwhile lands on the meta device. A thread that builds modules
while another loads (a job's LoRA layers, a second training thread's base copy, a bank) gets meta
or uninitialised parameters. Seen in CI: a Triton `personalize` instance with two training threads
loaded its second base copy beside the first and the job failed "Cannot copy out of meta tensor".

So every model load (Engine.from_pretrained) and every run-time replacement of a model's layers
(service.adapters.bank.replace_linears: the trainers' LoRA layers, the serving bank, the edit
workbench's copies) holds MODULE_CONSTRUCTION. Re-entrant: a load may build a bank. Training and
sampling steps build no modules and never take it.
"""

import threading

MODULE_CONSTRUCTION = threading.RLock()

__all__ = ["MODULE_CONSTRUCTION"]
