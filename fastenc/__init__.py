"""fastenc: a fast runtime for BERT-family encoders, with hand-written Triton kernels.

The public names of the contract (API.md) and nothing else.
"""

from .config import EncoderConfig
from .encoder import Encoder
from .errors import BackendError, FastencError, InputError, LoadError

__version__ = "0.1.0"

__all__ = ["Encoder", "EncoderConfig", "FastencError", "LoadError", "InputError", "BackendError", "__version__"]
