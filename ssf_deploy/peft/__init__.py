"""SSF as a PEFT method (``pip install "ssf-deploy[hf]"``).

Importing this package registers SSF with PEFT (see :mod:`.registration` for how, and for the
supported PEFT versions), after which PEFT's own verbs work::

    import ssf_deploy.peft
    from peft import PeftModel, get_peft_model
    from ssf_deploy.peft import SSFConfig

    model = get_peft_model(base, SSFConfig(modules_to_save=["classifier"]))
    model.print_trainable_parameters()
    ...                                    # train: transformers.Trainer or your own loop
    model.save_pretrained("adapter/")      # adapter_config.json + adapter_model.safetensors
    model = PeftModel.from_pretrained(base, "adapter/")
    merged = model.merge_and_unload()      # exact, graph-level: the base class, the base's keys
"""
from __future__ import annotations

from .config import SSFConfig
from .layer import SSFLayer
from .model import MERGE_ATOL, SSFModel
from .registration import PEFT_RANGE, register

register(SSFConfig, SSFModel)

__all__ = ["SSFConfig", "SSFModel", "SSFLayer", "PEFT_RANGE", "MERGE_ATOL"]
