"""fastenc: a fast runtime for BERT-family encoders, with hand-written Triton kernels.

The public names of the contract (API.md) and nothing else. ``import fastenc`` does not import
``transformers``; ``attn_implementation="fastenc"`` is registered with it when (or if) it is imported
(see ``fastenc/integrations/__init__.py``).
"""

from .config import EncoderConfig
from .encoder import Encoder
from .errors import BackendError, FastencError, InputError, LoadError
from .integrations import install_import_hooks as _install_import_hooks
from .integrations import optimize
from .integrations.ray import embed_dataset  # ray itself is imported by nothing until a dataset runs
from .multivector import maxsim
from .pipelines import pipeline

__version__ = "0.1.0"

__all__ = ["Encoder", "EncoderConfig", "FastencError", "LoadError", "InputError", "BackendError", "optimize",
           "pipeline", "embed_dataset", "maxsim", "__version__"]

_install_import_hooks()
