"""Teacher and student models: TransformerLens 4 bridges built from a ModelSpec."""
from circuitkd.models.build import (
    attach_spec, build_model, class_logits, default_device, forward_logits, model_device, read_position,
    resolve_spec, select_class_logits, spec_of,
)
from circuitkd.models.checkpoint import is_checkpoint, load_checkpoint, load_config, save_checkpoint
from circuitkd.models.pair import ModelPair

__all__ = [
    "attach_spec", "build_model", "class_logits", "default_device", "forward_logits", "model_device",
    "read_position", "resolve_spec", "select_class_logits", "spec_of", "is_checkpoint", "load_checkpoint",
    "load_config", "save_checkpoint", "ModelPair",
]
