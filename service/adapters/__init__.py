"""The adapter bank: per-request LoRA / textual-inversion adapters served in one batched UNet call.

- formats: parse diffusers/peft LoRA safetensors into an ``Adapter``, validate, export back.
- bank: ``AdapterBank`` (preallocated slots on the UNet's attention projections and, for conv LoRA,
  its convolutions (conv.py), per-row routing).
- manager: ``AdapterManager`` (slot residency, LRU eviction, pinning, loading, metrics).
- ``PromptEncoder`` (per-row learned tokens without touching shared weights) lives in
  service/engine/text.py, which every prompt passes through; re-exported here.
- serving: ``BankedAdapters``, the engine's AdapterHook built from the pieces above.

See docs/adapter_bank.md.
"""

from .bank import (
    DEFAULT_TEXT_ENCODER_TARGETS,
    DEFAULT_UNET_CONV_TARGETS,
    DEFAULT_UNET_TARGETS,
    SERVED_TEXT_ENCODER_TARGETS,
    SERVED_UNET_TARGETS,
    AdapterBank,
    BankedLoRAConv2d,
    BankedLoRALinear,
    BankState,
)
from .errors import AdapterBankFull, AdapterError, AdapterFormatError, AdapterNotFoundError
from .formats import (
    Adapter,
    LoraModule,
    export_diffusers_lora,
    export_textual_inversion,
    parse_adapter,
    serialize_adapter,
    validate_adapter,
    write_diffusers_lora_dir,
)
from .manager import AdapterManager, AdapterMetrics
from .serving import BankedAdapters
from service.engine.text import PromptEncoder

__all__ = [
    "Adapter",
    "AdapterBank",
    "AdapterBankFull",
    "AdapterError",
    "AdapterFormatError",
    "AdapterManager",
    "AdapterMetrics",
    "AdapterNotFoundError",
    "BankState",
    "BankedAdapters",
    "BankedLoRAConv2d",
    "BankedLoRALinear",
    "DEFAULT_TEXT_ENCODER_TARGETS",
    "DEFAULT_UNET_CONV_TARGETS",
    "DEFAULT_UNET_TARGETS",
    "SERVED_TEXT_ENCODER_TARGETS",
    "SERVED_UNET_TARGETS",
    "LoraModule",
    "PromptEncoder",
    "export_diffusers_lora",
    "export_textual_inversion",
    "parse_adapter",
    "serialize_adapter",
    "validate_adapter",
    "write_diffusers_lora_dir",
]
