"""Stable Diffusion 1.x (and our embedded model, of the same architecture): the base family."""

from .base import ModelFamily

SD1 = ModelFamily
