"""minigmr: a minimal, from-scratch multimodal-LLM reranker (Qwen2.5-VL turned into a yes/no judge, as GMR)."""
from .config import Config, TextConfig, VisionConfig
from .model import Qwen25VL
from .processor import ImageProcessor, Processor
from .scoring import Reranker

__all__ = ["Config", "TextConfig", "VisionConfig", "Qwen25VL", "ImageProcessor", "Processor", "Reranker"]
