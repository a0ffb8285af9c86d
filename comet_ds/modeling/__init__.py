"""CoMeT on a Hugging Face decoder: memory, layers, the chunked model, LoRA, save and load, a tiny local base.

The tiny base's family names live here, apart from the modules that import torch, so the command line
offers them as choices without loading torch.
"""

# the decoder families (Hugging Face model types) `tiny_base` builds
ARCHITECTURES = ("llama", "qwen3", "qwen2", "mistral")
