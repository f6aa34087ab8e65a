"""The transformers model family: ``transformers:<hub id or local folder>``.

What the pipeline needs to know about a transformers model, in one place:

* **creation** from a name: the config comes from the hub id or the local folder (``config.json``,
  as ``save_pretrained`` writes it); the class is the Auto class for image classification, else
  sequence classification, with ``num_labels`` set to the task's classes. ``pretrained`` loads
  that id's or folder's weights (a new head when the class count differs); otherwise the weights
  are drawn from torch's RNG, which ``init_seed`` makes reproducible bit for bit.
* **inputs**: images as ``pixel_values`` ``[B, C, H, W]``; text as ``{"input_ids",
  "attention_mask"}`` ``[B, L]`` (:func:`ssf_deploy.models.token_batch`). For text models the
  pipeline's "image size" slot carries the sequence length and the channel count is 0.
* **outputs**: the model output's fields (``logits`` for classifiers), which are also the ONNX
  output names; the ONNX inputs are named as the model's arguments.
* **SSF sites**: where in a block a module sits, from transformers' module names (``layer.N``,
  ``layers.N``, ``blocks.N``; ``attention``/``self_attn``, ``intermediate``/``output``/``mlp``...),
  so ``blocks=``, ``exclude=`` and ``only=`` (the paper's Table 6) mean what they mean for timm.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import warnings
from typing import Optional

import torch
import transformers  # noqa: F401  (the extra: a missing one fails here, where families.py says so)
from torch import nn

from ..errors import BaseMismatchError, CheckpointError, UsageError, first_line
from ..families import ModelFamily, register_family
from ..models import creation_record, token_batch

__all__ = ["TransformersFamily", "PREFIX", "TEXT_LENGTH", "arch_name"]

PREFIX = "transformers"
TEXT_LENGTH = 16      # default sequence length of example and probe inputs for text models
_HEADS = ("classifier", "score", "head", "qa_outputs")
_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|block|blocks)\.\d+(?=\.|$)")
_STAGE_CHILDREN = {"downsample", "downsampling_layer"}
_ATTN = {"attention", "attn", "self_attn", "crossattention", "self_attention"}
_MLP = {"mlp", "intermediate", "output", "pwconv1", "pwconv2", "fc1", "fc2", "ffn",
        "feed_forward"}
_EMBED = {"embeddings", "embedder", "patch_embed", "patch_embeddings"}
_NORMS = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def arch_name(ident: str) -> str:
    """``transformers:<ident>`` for a hub id or a local folder."""
    return f"{PREFIX}:{ident}"


@contextlib.contextmanager
def _quiet():
    """transformers' own notices (new head initialised, ...) are not our output."""
    from transformers.utils import logging as hf_logging
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _vision(config):
    """The vision part of a config (CLIP/SigLIP keep it in ``vision_config``), else None."""
    if getattr(config, "vision_config", None) is not None:
        return config.vision_config
    return config if hasattr(config, "num_channels") and hasattr(config, "image_size") else None


def _size(value) -> int:
    return int(value[0] if isinstance(value, (tuple, list)) else value)


class TransformersFamily(ModelFamily):
    name = PREFIX
    prefix = PREFIX
    module_prefix = "transformers"

    # ---------------------------------------------------------------------- names and configs

    def ident(self, arch: str) -> str:
        ident = arch.split(":", 1)[1].strip() if ":" in arch else ""
        if not ident:
            raise UsageError(f"'{arch}' names no model: use transformers:<hub id or local folder>")
        return ident

    def resolve(self, arch: str) -> str:
        ident = self.ident(arch)
        return arch_name(ident.rstrip("/") if os.path.isdir(ident) else ident)

    def config(self, arch: str, overrides: Optional[dict] = None):
        """The config of ``arch`` with ``overrides`` set (on its vision part where it has one)."""
        from transformers import AutoConfig
        ident = self.ident(arch)
        if os.path.isdir(ident) and not os.path.isfile(os.path.join(ident, "config.json")):
            raise UsageError(f"{ident} holds no config.json (write one with "
                             f"model.save_pretrained or config.save_pretrained)")
        try:
            with _quiet():
                config = AutoConfig.from_pretrained(ident)
        except (OSError, ValueError, KeyError) as e:
            where = "local folder" if os.path.isdir(ident) else "Hugging Face hub"
            raise CheckpointError(f"cannot read the config of {ident} from the {where} "
                                  f"(offline? use a local folder holding config.json): "
                                  f"{first_line(e)}") from None
        for key, value in (overrides or {}).items():
            vision = _vision(config)
            target = config if hasattr(config, key) or vision is None or \
                not hasattr(vision, key) else vision
            if not hasattr(target, key):
                raise UsageError(f"{type(config).__name__} has no field '{key}'")
            setattr(target, key, value)
        return config

    def auto_class(self, config):
        from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
        for auto in (AutoModelForImageClassification, AutoModelForSequenceClassification):
            if type(config) in auto._model_mapping:
                return auto
        raise UsageError(f"transformers has no image or sequence classification model for "
                         f"model type '{config.model_type}'")

    # ---------------------------------------------------------------------- creation

    def create(self, arch: str, num_classes: int, *, pretrained: bool = False, **kwargs):
        config = self.config(arch, kwargs)
        config.num_labels = int(num_classes)
        auto = self.auto_class(config)
        if not pretrained:
            with _quiet():
                return auto.from_config(config)
        ident = self.ident(arch)
        try:
            with _quiet():
                model, info = auto.from_pretrained(ident, config=config, dtype=torch.float32,
                                                   ignore_mismatched_sizes=True,
                                                   output_loading_info=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load the pretrained weights of {ident} (offline? use "
                                  f"a local folder written by save_pretrained): "
                                  f"{first_line(e)}") from None
        # a new classifier is expected (other classes); any other re-initialised tensor is not
        head = tuple(f"{n}." for n, m in model.named_modules()
                     if any(m is h for h in self.head_modules(model)))
        fresh = [k[0] if isinstance(k, (tuple, list)) else k
                 for k in list(info.get("missing_keys") or []) +
                 list(info.get("mismatched_keys") or [])]
        fresh = [k for k in fresh if not str(k).startswith(head)]
        if fresh:
            raise BaseMismatchError(f"the weights of {ident} do not fit this "
                                    f"{type(model).__name__} ({len(fresh)} tensor(s) would be "
                                    f"initialised at random, first '{fresh[0]}'; another "
                                    f"`image_size` or `model_kwargs` than the checkpoint's?)")
        return model

    def source(self, arch: str) -> str:
        ident = self.ident(arch)
        if os.path.isdir(ident):
            return f"hf-folder:{os.path.basename(os.path.normpath(ident))}"
        return f"hf-hub:{ident}"

    def rebuild(self, model: nn.Module, rec: Optional[dict], meta: bool) -> nn.Module:
        config = copy.deepcopy(model.config)
        with _quiet(), (torch.device("meta") if meta else contextlib.nullcontext()):
            return type(model)._from_config(config)

    def sized_kwargs(self, arch: str, kwargs: dict, image_size: Optional[int]) -> tuple[dict, int]:
        vision = _vision(self.config(arch, kwargs))
        if vision is None:
            return kwargs, int(image_size or TEXT_LENGTH)
        default = _size(vision.image_size)
        size = int(image_size or default)
        if size != default:
            kwargs = dict(kwargs, image_size=size)
        return kwargs, size

    # ---------------------------------------------------------------------- inputs and outputs

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        vision = _vision(model.config)
        if vision is None:
            return 0, TEXT_LENGTH, TEXT_LENGTH
        size = _size(vision.image_size)
        return int(vision.num_channels), size, size

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        heads = [getattr(model, n) for n in _HEADS if isinstance(getattr(model, n, None), nn.Module)]
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(out, nn.Module) and all(out is not h for h in heads):
            heads.append(out)
        return [h for h in heads if any(True for _ in h.parameters())]

    def example_input(self, model: nn.Module, batch: int, image_size: Optional[int], seed: int):
        c, h, w = self.input_size(model)
        if c == 0:
            return token_batch(batch, image_size or h, model.config.vocab_size, seed)
        if image_size:
            h = w = int(image_size)
        return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(seed))

    def probe_spec(self, model: nn.Module, image_size: int, in_chans: int, batch: int) -> dict:
        c = self.input_size(model)[0]
        if c == 0:
            return {"kind": "tokens", "shape": [int(batch), int(image_size)],
                    "vocab": int(model.config.vocab_size)}
        return {"shape": [int(batch), c, int(image_size), int(image_size)]}

    def onnx_names(self, model: nn.Module, example) -> tuple[list[str], list[str]]:
        from ..models import call_model, inputs_to
        inputs = list(example) if isinstance(example, dict) else ["pixel_values"]
        ref = next(model.parameters(), None)
        with torch.no_grad():
            out = call_model(model, inputs_to(example, ref.device if ref is not None else None))
        outputs = [k for k, v in out.items() if isinstance(v, torch.Tensor)] \
            if isinstance(out, dict) else ["logits"]
        return inputs, outputs

    def data_config(self, model: Optional[nn.Module] = None, arch: Optional[str] = None) -> dict:
        """timm-style data config from the model's ``preprocessor_config.json`` (its folder or
        hub id) when there is one; else ImageNet's mean/std, no crop."""
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        if arch is None and model is not None:
            arch = (creation_record(model) or {}).get("arch")
        proc = self._processor_config(arch) if arch else {}
        # without a model (quantize: the ONNX gives the size) the config is not read at all
        c, h, _ = self.input_size(model) if model is not None else (3, 224, 224)
        return {"input_size": (c, h, h),
                "mean": tuple(proc.get("image_mean") or IMAGENET_DEFAULT_MEAN),
                "std": tuple(proc.get("image_std") or IMAGENET_DEFAULT_STD),
                "interpolation": _RESAMPLE.get(proc.get("resample"), "bicubic"),
                "crop_pct": float(proc.get("crop_pct") or 1.0), "crop_mode": "center"}

    def _processor_config(self, arch: str) -> dict:
        ident = self.ident(arch)
        path = os.path.join(ident, "preprocessor_config.json")
        if not os.path.isdir(ident):
            try:
                from huggingface_hub import hf_hub_download
                path = hf_hub_download(ident, "preprocessor_config.json")
            except Exception:   # offline, or the repo has none: the defaults
                return {}
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    # ---------------------------------------------------------------------- SSF sites

    def site_place(self, name: str, module: nn.Module) -> tuple[Optional[str], str]:
        parts = name.split(".")
        found = list(_BLOCK.finditer(name))
        block = name[:found[-1].end()] if found else None
        if block is not None:
            rest = name[len(block):].lstrip(".").split(".")[0]
            if rest in _STAGE_CHILDREN:
                block = None
        if block is None:
            if any(p in _EMBED for p in parts):
                return None, "embed"
            return None, "final" if isinstance(module, _NORMS) else "other"
        inner = name[len(block):].lstrip(".").split(".")
        if isinstance(module, _NORMS):
            return block, "norm"
        if any(p in _ATTN for p in inner):
            return block, "attn"
        if any(p in _MLP for p in inner):
            return block, "mlp"
        return block, "other"


register_family(TransformersFamily())
