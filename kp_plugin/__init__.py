"""kp-plugin: lock vision models with a secret key.

A model fine-tuned on images passed through a key-driven block-wise
transform is accurate with the key and near chance without it. The weights
can be published; the key never leaves the owner.

Example:
    >>> from kp_plugin import SecretKey, wrap_model, save_protected, load_protected
    >>> key = SecretKey.generate(block_size=16)
    >>> model = wrap_model(base_model, key)            # doctest: +SKIP
    >>> logits = model(images01)                       # doctest: +SKIP

The core imports torch and safetensors only; timm, transformers and
huggingface_hub are imported by their adapter modules
(``kp_plugin.timm``, ``kp_plugin.hf``, ``kp_plugin.hub``) when you use them.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    BlockSizeError,
    CheckpointError,
    CheckpointWriteError,
    ConfigurationError,
    InputDtypeError,
    InputRangeError,
    KeyFileError,
    KeyFileExistsError,
    KeyFilePermissionWarning,
    KeyFileWriteError,
    KeyLeakError,
    KeyPicklingError,
    KeyMismatchError,
    KPError,
)
from .keys import DEFAULT_SCHEME, PAPER_SCHEME, SecretKey, parse_scheme  # noqa: E402
from .transforms import apply_transform, compile_plan, invert_transform  # noqa: E402
from .module import KeyedInput, ProtectedModel, unwrap, wrap_model  # noqa: E402
from .checkpoint import ProtectionConfig, load_protected, save_protected  # noqa: E402

__all__ = [
    "__version__",
    "SecretKey",
    "DEFAULT_SCHEME",
    "PAPER_SCHEME",
    "parse_scheme",
    "apply_transform",
    "invert_transform",
    "compile_plan",
    "KeyedInput",
    "ProtectedModel",
    "wrap_model",
    "unwrap",
    "save_protected",
    "load_protected",
    "ProtectionConfig",
    "KPError",
    "KeyFileError",
    "KeyFileExistsError",
    "KeyFileWriteError",
    "KeyFilePermissionWarning",
    "KeyMismatchError",
    "CheckpointError",
    "CheckpointWriteError",
    "InputRangeError",
    "InputDtypeError",
    "BlockSizeError",
    "ConfigurationError",
    "KeyLeakError",
    "KeyPicklingError",
]
