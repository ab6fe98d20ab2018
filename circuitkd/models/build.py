"""Build TransformerLens 4 ``TransformerBridge`` models from a :class:`ModelSpec`.

Three backbones (see docs/architecture.md): the TL-native bidirectional encoder (class read at the
CLS position 0), HF ``BertForSequenceClassification`` (from config or pretrained) wrapped
as a BERT bridge whose unembedding is the classifier, and HF ``ViTForImageClassification``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from circuitkd.config import ModelSpec
from circuitkd.errors import CircuitKDError
from circuitkd.native import class_logits_native, supported as native_supported

SPEC_ATTR = "circuitkd_spec"


def _bridge_classes():
    from transformer_lens.model_bridge.bridge import TransformerBridge
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)

    return TransformerBridge


def default_device() -> torch.device:
    """CUDA when there is a GPU, else CPU: chosen once, when a model is built or loaded."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_spec(spec: ModelSpec, task: Any = None) -> ModelSpec:
    """Fill ``n_classes``, ``d_vocab`` and ``n_ctx`` from the task where the spec leaves them None."""
    changes: dict[str, Any] = {}
    if task is not None:
        if spec.n_classes is None:
            changes["n_classes"] = task.n_classes
        elif spec.n_classes != task.n_classes:
            raise CircuitKDError(
                f"task {task.name!r} has {task.n_classes} labels but the model spec declares "
                f"n_classes={spec.n_classes}"
            )
        if task.modality == "text":
            if spec.backbone == "vit":
                raise CircuitKDError(f"backbone 'vit' cannot read the text task {task.name!r}")
            if spec.d_vocab is None and task.vocab_size is not None:
                changes["d_vocab"] = task.vocab_size
            elif spec.d_vocab is not None and task.vocab_size is not None and spec.d_vocab < task.vocab_size:
                raise CircuitKDError(f"spec d_vocab={spec.d_vocab} is below task {task.name!r}'s vocabulary of "
                                     f"{task.vocab_size} token ids; leave d_vocab unset to take it from the task")
            if spec.n_ctx is None:
                changes["n_ctx"] = max(task.seq_len, 8)
            elif spec.n_ctx < task.seq_len:
                raise CircuitKDError(f"spec n_ctx={spec.n_ctx} is shorter than task inputs ({task.seq_len} tokens)")
        elif task.modality == "image":
            if spec.backbone != "vit":
                raise CircuitKDError(
                    f"backbone {spec.backbone!r} cannot read the image task {task.name!r}; use backbone='vit'"
                )
            # A pretrained ViT's sizes come from its own config (checked against the task once read).
            if spec.pretrained is None:
                size = int(task.train.inputs.shape[-1])
                channels = int(task.train.inputs.shape[1])
                if spec.image_size != size:
                    changes["image_size"] = size
                if spec.n_channels != channels:
                    changes["n_channels"] = channels
    spec = spec.replace(**changes) if changes else spec
    if spec.pretrained is None:
        # A causal native model without n_classes is a language model (d_vocab outputs).
        if spec.n_classes is None and not (spec.causal and spec.backbone == "native"):
            raise CircuitKDError("model spec has no n_classes: pass a task or set ModelSpec(n_classes=...)")
        if spec.backbone != "vit" and (spec.d_vocab is None or spec.n_ctx is None):
            raise CircuitKDError(
                "text model spec needs d_vocab and n_ctx: pass a task or set ModelSpec(d_vocab=..., n_ctx=...)"
            )
    return spec


def check_image_input(spec: ModelSpec, task: Any, who: str = "model") -> None:
    """Refuse a ViT whose input size or channel count differs from the image task's pictures.

    A ViT built from config adapts to the task (:func:`resolve_spec`); a pretrained one, a checkpoint
    or a teacher does not, and HF's patch embedding would fail mid-run or read the wrong grid.
    """
    if spec.backbone != "vit" or task is None or getattr(task, "modality", None) != "image":
        return
    split = next((s for s in task.splits.values() if len(s)), None)
    if split is None:
        return
    shape = tuple(int(d) for d in split.inputs.shape[1:])
    want = (spec.n_channels, spec.image_size, spec.image_size)
    if shape != want:
        raise CircuitKDError(f"{who} reads {want[0]}x{want[1]}x{want[2]} images (channels x height x width) but task "
                             f"{task.name!r} has {shape[0]}x{shape[1]}x{shape[2]} images" if len(shape) == 3 else
                             f"{who} reads {want[0]}x{want[1]}x{want[2]} images but task {task.name!r} has inputs of "
                             f"shape {shape}")


def check_spec_reads(spec: ModelSpec, task: Any, who: str = "model") -> None:
    """Before anything is trained: refuse a spec the task does not fit (:func:`resolve_spec`: another
    number of labels, a backbone that cannot read the task's inputs, a patch size that does not divide
    its images), and a pretrained ViT whose saved input size or channels differ from the task's images
    (read from its config alone; a ViT built from config adapts to the task)."""
    try:
        resolve_spec(spec, task)
    except CircuitKDError as exc:
        raise CircuitKDError(f"{who}: {exc}") from None
    if spec.backbone != "vit" or not spec.pretrained:
        return
    from transformers import ViTConfig

    try:
        vc = ViTConfig.from_pretrained(spec.pretrained)
    except (OSError, ValueError) as exc:
        raise CircuitKDError(f"cannot read the config of pretrained ViT {spec.pretrained!r}: {exc}") from None
    check_image_input(spec.replace(image_size=vc.image_size, n_channels=vc.num_channels, patch_size=vc.patch_size),
                      task, f"{who} (pretrained ViT {spec.pretrained!r})")


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; :class:`CircuitKDError` naming it when torch does not know it."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CircuitKDError(f"unknown device {device!r}: expected e.g. 'cpu', 'cuda' or 'cuda:0'") from None


def build_model(spec: ModelSpec, task: Any = None, *, device: Optional[str | torch.device] = None,
                dtype: Optional[torch.dtype] = None):
    """A fresh (or pretrained) ``TransformerBridge`` for ``spec``, in eval mode, on ``device``.

    ``task`` fills the sizes the spec leaves open. The resolved spec is stored on the
    model (see :func:`spec_of`) and saved with every checkpoint.
    """
    spec = resolve_spec(spec, task)
    device = parse_device(device) if device is not None else default_device()
    if spec.backbone == "native":
        bridge = _build_native(spec, device, dtype)
    elif spec.backbone == "bert":
        bridge, spec = _build_bert(spec, device, dtype)
    else:
        bridge, spec = _build_vit(spec, device, dtype)
        check_image_input(spec, task, f"pretrained ViT {spec.pretrained!r}" if spec.pretrained else "the ViT")
    setattr(bridge, SPEC_ATTR, spec)
    bridge.eval()
    return bridge


def spec_of(model) -> ModelSpec:
    """The resolved :class:`ModelSpec` a circuitkd-built model carries."""
    spec = getattr(model, SPEC_ATTR, None)
    if spec is None:
        raise CircuitKDError(
            f"model of type {type(model).__name__} was not built by circuitkd (no spec attached); "
            "build it with circuitkd.build_model or attach one with circuitkd.models.attach_spec"
        )
    return spec


def attach_spec(model, spec: ModelSpec):
    """Record ``spec`` on a bridge built outside circuitkd, so circuitkd can use it."""
    setattr(model, SPEC_ATTR, spec)
    return model


def init_seed(spec: ModelSpec) -> int:
    """The weight-initialisation seed: ``spec.seed`` mixed with the architecture.

    Without the mix, a 2-layer student and a 4-layer teacher of one width built with the
    same seed would start from identical first layers, and a student "trained alone" would
    secretly share the teacher's initialisation.
    """
    return (spec.seed * 1_000_003 + spec.n_layers * 10_007 + spec.d_model * 101 + spec.n_heads) % (2**31 - 1)


def _build_native(spec: ModelSpec, device: torch.device, dtype: Optional[torch.dtype]):
    from transformer_lens.config import TransformerBridgeConfig

    TransformerBridge = _bridge_classes()
    d_vocab_out = spec.n_classes if (not spec.causal or spec.n_classes) else spec.d_vocab
    cfg = TransformerBridgeConfig(
        d_model=spec.d_model,
        d_head=spec.d_head,
        n_heads=spec.n_heads,
        n_layers=spec.n_layers,
        n_ctx=spec.n_ctx,
        d_vocab=spec.d_vocab,
        d_vocab_out=d_vocab_out,
        d_mlp=spec.d_mlp or 4 * spec.d_model,
        attention_dir="causal" if spec.causal else "bidirectional",
        act_fn=spec.act_fn,
        normalization_type="LN",
        attn_only=spec.attn_only,
        seed=init_seed(spec),
    )
    return TransformerBridge.boot_native(cfg, device=device, dtype=dtype)


def _check_local(name: str) -> None:
    # A path-like name that does not exist is a typo, not a hub id: say so before HF tries the hub.
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise CircuitKDError(f"pretrained model folder not found: {name}")


def _bert_post_adapter(adapter) -> None:
    # A sequence classifier has no MLM head: the classifier is the unembedding.
    from transformer_lens.model_bridge.generalized_components import UnembeddingBridge

    adapter.component_mapping.pop("mlm_head", None)
    adapter.component_mapping.pop("ln_final", None)
    adapter.component_mapping["unembed"] = UnembeddingBridge(name="classifier")


def _hf_model(spec: ModelSpec, hf_class, config, what: str, **pretrained_kwargs):
    """A seeded HF model: loaded from ``spec.pretrained`` (its classifier sized to ``n_classes``) or built from ``config``."""
    with torch.random.fork_rng(devices=[]):
        if spec.pretrained is None:
            torch.manual_seed(init_seed(spec))
            return hf_class(config)
        _check_local(spec.pretrained)
        if spec.n_classes is not None:
            pretrained_kwargs["num_labels"] = spec.n_classes
        torch.manual_seed(spec.seed)  # seeds a freshly initialised classifier head
        try:
            return hf_class.from_pretrained(spec.pretrained, **pretrained_kwargs)
        except OSError as exc:
            raise CircuitKDError(f"cannot load pretrained {what} {spec.pretrained!r}: {exc}") from exc


def _wrap(hf, architecture: str, device: torch.device, dtype: Optional[torch.dtype], **kwargs):
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    hf = hf.to(device=device, dtype=dtype) if dtype is not None else hf.to(device)
    return build_bridge_from_module(hf, architecture, hf_config=hf.config, **kwargs)


def _build_bert(spec: ModelSpec, device: torch.device, dtype: Optional[torch.dtype]):
    from transformers import BertConfig, BertForSequenceClassification

    config = None if spec.pretrained is not None else BertConfig(
        vocab_size=spec.d_vocab, hidden_size=spec.d_model, num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads, intermediate_size=spec.d_mlp or 4 * spec.d_model,
        max_position_embeddings=spec.n_ctx, num_labels=spec.n_classes,
        hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=spec.dropout,
        hidden_act="gelu" if spec.act_fn == "gelu" else spec.act_fn,
    )
    hf = _hf_model(spec, BertForSequenceClassification, config, "BERT")
    hc = hf.config
    spec = spec.replace(
        n_layers=hc.num_hidden_layers, d_model=hc.hidden_size, n_heads=hc.num_attention_heads,
        d_mlp=hc.intermediate_size, n_ctx=hc.max_position_embeddings, d_vocab=hc.vocab_size,
        n_classes=hc.num_labels,
    )
    return _wrap(hf, "BertForMaskedLM", device, dtype, post_adapter_hook=_bert_post_adapter), spec


def _build_vit(spec: ModelSpec, device: torch.device, dtype: Optional[torch.dtype]):
    from transformers import ViTConfig, ViTForImageClassification

    config = None if spec.pretrained is not None else ViTConfig(
        image_size=spec.image_size, patch_size=spec.patch_size, num_channels=spec.n_channels,
        hidden_size=spec.d_model, num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
        intermediate_size=spec.d_mlp or 4 * spec.d_model, num_labels=spec.n_classes,
        hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=spec.dropout,
    )
    hf = _hf_model(spec, ViTForImageClassification, config, "ViT", ignore_mismatched_sizes=True)
    vc = hf.config
    spec = spec.replace(
        n_layers=vc.num_hidden_layers, d_model=vc.hidden_size, n_heads=vc.num_attention_heads,
        d_mlp=vc.intermediate_size, image_size=vc.image_size, patch_size=vc.patch_size,
        n_channels=vc.num_channels, n_classes=vc.num_labels,
    )
    return _wrap(hf, "ViTForImageClassification", device, dtype), spec


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free model)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def read_position(model) -> int:
    """Where the class is read: 0 (CLS) for encoders, -1 for causal models."""
    spec = getattr(model, SPEC_ATTR, None)
    return -1 if (spec is not None and spec.causal) else 0


def forward_logits(model, inputs: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Raw bridge output: ``[batch, n_classes]`` for BERT/ViT, ``[batch, pos, d_vocab_out]`` for native models."""
    if inputs.is_floating_point():
        return model(inputs)
    if attention_mask is not None:
        return model(inputs, attention_mask=attention_mask)
    return model(inputs)


def class_logits(model, inputs: Tensor, attention_mask: Optional[Tensor] = None) -> Float[Tensor, "batch n_classes"]:
    """Class logits ``[batch, n_classes]`` for any supported classifier.

    Native encoders are read at the CLS position 0; a causal native model is read at each
    example's last real token.
    """
    if not inputs.is_floating_point() and uses_native_forward(model):
        return class_logits_native(model, inputs, attention_mask, read_positions(model, inputs, attention_mask))
    out = forward_logits(model, inputs, attention_mask)
    return select_class_logits(model, out, attention_mask)


def uses_native_forward(model) -> bool:
    """Whether :func:`class_logits` reads ``model`` through :mod:`circuitkd.native` (same logits, no hooks).

    Not through a DistributedDataParallel wrapper: DDP synchronises gradients in its own forward.
    """
    from torch.nn.parallel import DistributedDataParallel

    return not isinstance(model, DistributedDataParallel) and native_supported(model)


def read_positions(model, inputs: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """``Int[batch]``: where each example's class is read (0 for encoders; the last real token if causal).

    Only ``inputs``' leading ``[batch, pos]`` shape and device are used (tokens or a per-position output).
    """
    B, P = inputs.shape[:2]
    if read_position(model) == 0:
        return torch.zeros(B, dtype=torch.long, device=inputs.device)
    if attention_mask is None:
        return torch.full((B,), P - 1, dtype=torch.long, device=inputs.device)
    return attention_mask.long().sum(dim=1) - 1


def select_class_logits(model, out: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Reduce a raw bridge output to ``[batch, n_classes]`` (see :func:`class_logits`)."""
    if out.dim() == 2:
        return out
    return out[torch.arange(out.shape[0], device=out.device), read_positions(model, out, attention_mask)]
