"""comet_ds: fine-tune Hugging Face decoders into CoMeT memory models on DeepSpeed pipelines."""

from comet_ds.config import CometConfig, CometConfigError, CometTokens

__version__ = "0.1.0"

__all__ = ["CometConfig", "CometConfigError", "CometTokens", "__version__"]
