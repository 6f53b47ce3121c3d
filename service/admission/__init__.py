"""Admission in front of the model backend: deadline-aware refusal and fairness between tenants.

The gateway runs every Generate and Edit through `Admission.run(tenant, cost, deadline, work)`:

- a number of requests run at once, whose denoising steps share each UNet call (the step batcher,
  in-process or in Triton's `generate` model): the batch width this device pays for
  (`BatchWidth`, service/engine/width.py: the widest whose calls cost each request at most 1.4x
  its time alone, measured; 1-2 on a CPU, wide on a GPU), at most the slots setting, and no wider
  than the running requests' deadlines allow;
- one FIFO queue per tenant, served in start-time fair order (each request tagged with a virtual
  start: its tenant's previous request's end, or now if the tenant was idle; lowest tag first): a
  tenant's flood waits behind itself, so another tenant's request starts right after what is
  running, and a busy tenant still gets its share;
- refusal at once, with RESOURCE_EXHAUSTED and the estimated wait in the message, when the queue is
  full, a tenant exceeds its queue or rate limit, or the request cannot finish before its deadline
  by the estimate: the requests tagged before it plus what is still running, in
  seconds from measured service times (an exponential average of seconds per unit of work, per
  kind of request), divided by the requests run at once. A request too slow for its deadline even on an idle
  service gets DEADLINE_EXCEEDED at once instead (waiting for a quieter moment would not help);
- queued requests that reach their deadline leave with DEADLINE_EXCEEDED; a client that goes away
  frees its place.

Work units (see `generate_cost`, `edit_cost`) are UNet rows x steps, so a 50-step, 4-image request
weighs what it costs. Everything here runs on the gateway's event loop: no locks (but in
`BatchWidth`, which the model thread feeds).
"""

from __future__ import annotations

from .controller import Admission, AdmissionLimits, Refused
from .costs import edit_cost, generate_cost
from service.engine.width import BatchWidth

__all__ = ["Admission", "AdmissionLimits", "BatchWidth", "Refused", "edit_cost", "generate_cost"]
