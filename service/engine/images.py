"""Image bytes <-> PIL, with the limits a public endpoint needs."""

from __future__ import annotations

import io
import warnings

from PIL import Image

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


class ImageDecodeError(ValueError):
    pass


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decodes PNG/JPEG/WebP bytes to RGB, refusing oversized or malformed images before decoding
    pixel data (the header is read first, so a decompression bomb never allocates)."""
    if not data:
        raise ImageDecodeError("image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image is {width}x{height}; at most {max_pixels} pixels are accepted")
            image.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image is too large to decode: {exc}") from exc
    except Exception as exc:  # PIL raises many types for malformed input
        raise ImageDecodeError(f"not a decodable PNG/JPEG/WebP image ({type(exc).__name__}: {exc})") from exc
    return image.convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
