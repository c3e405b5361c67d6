"""Model definitions. Every model exposes its block list (`layers`), `init_weights(seed)` and its shape."""

from models.llama import FLAVORS, ModelArgs, Transformer, build_model, count_params, model_args

__all__ = ["FLAVORS", "ModelArgs", "Transformer", "build_model", "count_params", "model_args"]
