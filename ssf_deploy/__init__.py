"""ssf-deploy: SSF fine-tuning from paper to production.

Pipeline, one module each: ``tuners`` (train-time methods) -> ``train`` -> ``fuse`` -> ``verify``
-> ``export`` (ONNX) -> ``engine`` (TensorRT) -> ``bench``.
"""
from .errors import SSFDeployError
from .models import count_params, create_base_model
from .tuners import METHODS, apply_method, load_trainable_state, method_of, trainable_state_dict

__version__ = "0.1.0"

__all__ = ["SSFDeployError", "METHODS", "apply_method", "count_params", "create_base_model",
           "method_of", "trainable_state_dict", "load_trainable_state", "fuse", "verify"]


def __getattr__(name):  # keep `import ssf_deploy` light; fuse/verify pull in torch.export/onnx
    if name == "fuse":
        from .fuse import fuse
        return fuse
    if name == "verify":
        from .verify import verify
        return verify
    raise AttributeError(name)
