"""Student and teacher CLIP models via open_clip (imports without the training extras)."""
from .factory import (
    MODEL_CONFIG_DIR,
    WORD_TOKENIZER_MODELS,
    ModelError,
    create_model,
    create_teacher,
    describe,
    embed_dim,
    get_preprocess,
    get_tokenizer,
    input_dtype,
    list_models,
    model_config,
    register_model_configs,
)
from .tokenizer import WordTokenizer

__all__ = [
    "MODEL_CONFIG_DIR", "ModelError", "WORD_TOKENIZER_MODELS", "create_model", "create_teacher", "describe",
    "embed_dim", "get_preprocess", "get_tokenizer", "input_dtype", "list_models", "model_config",
    "register_model_configs", "WordTokenizer",
]
