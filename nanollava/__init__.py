"""nanollava: LLaVA-1.5 rebuilt from scratch in plain PyTorch."""
from nanollava.vit import ViT, ViTConfig
from nanollava.llama import Llama, LlamaConfig
from nanollava.llava import LLaVA, LLaVAConfig
from nanollava.tokenizer import load_tokenizer
