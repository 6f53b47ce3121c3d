"""Decoupled cross-attention: each cross-attention layer attends to the text and, with its own K/V
projections, to a row's image tokens; the two results are added, the image part times the row's
scale, before the layer's one output projection. The math of diffusers' IPAdapterAttnProcessor2_0
(diffusers is the reference: tests/test_image_prompt_files.py), per row instead of per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .packing import ImagePromptLayout


class ImagePromptAttnProcessor(nn.Module):
    """The processor of one cross-attention layer (`attn2`). Its text part is diffusers'
    AttnProcessor2_0 step for step (same result, bit for bit, on a row without an image prompt)."""

    def __init__(self, to_k_ip: nn.Linear, to_v_ip: nn.Linear, layout: ImagePromptLayout):
        super().__init__()
        self.to_k_ip, self.to_v_ip, self.layout = to_k_ip, to_v_ip, layout

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("an image-prompt processor is for cross-attention layers only")
        text, image, scale, count = self.layout.unpack(encoder_hidden_states)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, text_length, _ = text.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        key, value = attn.to_k(text), attn.to_v(text)
        head_dim = key.shape[-1] // attn.heads

        def heads(x):
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query = heads(query)
        out = F.scaled_dot_product_attention(query, heads(key), heads(value), attn_mask=attention_mask,
                                             dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        if image is not None:
            # Each row attends to its own valid image tokens only (a row's padding is masked); a row
            # without any attends to one zero token, finite, and is multiplied by its scale 0. No
            # branch on the values (a traced or compiled UNet would freeze it): rows without an
            # image prompt cost this small attention too.
            n = image.shape[1]
            valid = torch.arange(n, device=image.device)[None, :] < count[:, None].clamp(min=1)
            ip = F.scaled_dot_product_attention(query, heads(self.to_k_ip(image)), heads(self.to_v_ip(image)),
                                                attn_mask=valid[:, None, None, :], dropout_p=0.0, is_causal=False)
            ip = ip.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
            out = out + scale.to(out.dtype)[:, None, None] * ip

        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
