"""Hugging Face transformers models in the ssf-deploy pipeline (``pip install "ssf-deploy[hf]"``).

Importing this package registers the transformers model family
(:class:`~ssf_deploy.hf.family.TransformersFamily`) with :mod:`ssf_deploy.families`; nothing else
needs it directly: an arch name ``transformers:<hub id or local folder>`` or a transformers model
instance loads it on first use. ``import ssf_deploy`` never imports transformers.
"""
from __future__ import annotations

from .family import PREFIX, TEXT_LENGTH, TransformersFamily, arch_name

__all__ = ["PREFIX", "TEXT_LENGTH", "TransformersFamily", "arch_name"]
