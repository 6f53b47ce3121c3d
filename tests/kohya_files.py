"""kohya/A1111-layout LoRA files for a served model, as kohya's trainer writes them (test support).

Every layer kohya's default network trains that the model has: the UNet's attention, feed-forward
and proj_in/proj_out (1x1 convolutions on SD 1.x, written 4-D as kohya does; Linear on SDXL) and
the text encoders' attention and MLP (`lora_te_` on SD 1.x, `lora_te1_`/`lora_te2_` on SDXL), with
`.alpha`; SDXL's UNet in its original (SGM) block names when `sgm`.
"""

from __future__ import annotations

import torch
from safetensors.torch import save
from torch import nn

from tests.test_lora_layouts import KOHYA_TE, KOHYA_UNET, kohya_key


def kohya_lora_file(engine, seed: int, rank: int = 4, alpha: float = 2.0, sgm: bool = False) -> bytes:
    family = "sdxl" if getattr(engine, "text_encoder_2", None) is not None else "sd"
    roots = {"unet": engine.unet, "text_encoder": engine.text_encoder}
    if family == "sdxl":
        roots["text_encoder_2"] = engine.text_encoder_2
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, root in roots.items():
        kinds = KOHYA_UNET if component == "unet" else KOHYA_TE
        for name, module in root.named_modules():
            if not name.endswith(kinds) or not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
                continue
            n_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            n_out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            down = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
            up = torch.randn(n_out, rank, generator=g) * 0.2
            if isinstance(module, nn.Conv2d):  # kohya writes a 1x1 conv's LoRA as 1x1 kernels
                down, up = down[:, :, None, None], up[:, :, None, None]
            key = kohya_key(family, f"{component}.{name}", sgm=sgm and component == "unet")
            tensors[f"{key}.lora_down.weight"] = down.half()
            tensors[f"{key}.lora_up.weight"] = up.half()
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return save(tensors)
