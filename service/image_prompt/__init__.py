"""Image prompts (IP-Adapter class): reference images as extra cross-attention tokens.

An image prompt is a few tokens of the UNet's cross-attention width, made from reference photos by
an image encoder and a projection (files.py loads both parts of a published IP-Adapter file), and
attended to by each cross-attention layer through its own K/V projections, beside the text
(attention.py: decoupled cross-attention, output = text attention + scale x image attention).

Rows carry their image prompt the way SDXL rows carry their pooled embedding: packed into trailing
tokens of the conditioning `embeds` (packing.py), so one UNet call can hold rows with different
users' image prompts, rows without any (scale 0: the base layer's result), and their LoRAs.
"""
