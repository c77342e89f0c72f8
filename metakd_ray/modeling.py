"""The Meta-KD teacher and student as a Hugging Face model: encoder + classifier + domain branch.

    z      = W_cls · ReLU(pool(x)) + b     (pooling "cls": pool = the encoder's pooler on [CLS])
    z      = W_cls · c(x) + b                (pooling "mean": the masked token mean, how sentence
                                               encoders such as MiniLM were trained to be read)
    z      = (W_cls · ...)[k]                (domain_heads: one classifier head per domain, the
                                               head of each example's domain k; the BERT-mtl teacher)
    c(x)   = masked mean of the last hidden layer               (content vector)
    pre    = W_c (c(x) + E_D[k]) + b                            (domain vector h_d, taken pre-tanh)
    g      = Dropout(tanh(pre)),  domain_logits = W_d g + b_d    (domain branch)

The domain vector that students match is taken before the tanh and without dropout, so the MSE
target is deterministic and not squashed. The student is the same model on fewer layers, plus one
projection W_fit to the teacher's width (identity-initialised when the widths match) shared by the
hidden states and the domain vector.

A saved model is an ordinary Hugging Face directory (``config.json`` with ``id2label``,
``model.safetensors``, the tokenizer and this file), so

    import metakd_ray.modeling                          # registers the Auto classes
    pipeline("text-classification", model=directory)

gives the trained head's predictions, and without metakd-ray installed ``trust_remote_code=True``
loads this file from the directory. It therefore imports nothing but torch and transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


class MetaKDConfig(PretrainedConfig):
    """``encoder``: the wrapped encoder's config as a dict; ``metakd``: where the model came from
    (kind, method, domain, domains, max_length, ...), written into the model card too."""

    model_type = "metakd"

    def __init__(self, encoder: dict | None = None, num_domains: int = 1, projection_dim: int = 0,
                 classifier_dropout: float = 0.1, metakd: dict | None = None, pooling: str = "cls",
                 domain_heads: bool = False, **kwargs):
        kwargs.setdefault("problem_type", "single_label_classification")
        super().__init__(**kwargs)
        self.encoder = encoder or {}
        self.num_domains = num_domains
        self.projection_dim = projection_dim
        self.classifier_dropout = classifier_dropout
        self.pooling = pooling
        self.domain_heads = domain_heads
        self.metakd = metakd or {}


@dataclass
class MetaKDOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [B, C]
    domain_logits: torch.Tensor | None = None  # [B, K]; None when no domain ids are given
    domain_vector: torch.Tensor | None = None  # [B, d] pre-tanh, no dropout
    hidden_states: tuple | None = None  # (embeddings, layer 1, ..., layer N), each [B, L, d]
    attention_scores: list | None = None  # per layer [B, heads, L, L], pre-softmax, unmasked


class MetaKDForSequenceClassification(PreTrainedModel):
    config_class = MetaKDConfig
    base_model_prefix = "metakd"
    _supports_sdpa = True

    def __init__(self, config: MetaKDConfig, encoder=None):
        """``encoder``: an already loaded (pretrained) encoder; by default one is built from
        ``config.encoder`` for ``from_pretrained`` to fill."""
        super().__init__(config)
        self.encoder = encoder if encoder is not None else AutoModel.from_config(encoder_config(config))
        if config.pooling == "mean" and getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # unused: DDP would wait forever for its gradients
        width = self.encoder.config.hidden_size
        self.classifier = nn.Linear(width, config.num_labels * (config.num_domains if config.domain_heads else 1))
        self.domain_embedding = nn.Embedding(config.num_domains, width)
        self.domain_corrupt = nn.Linear(width, width)
        self.domain_classifier = nn.Linear(width, config.num_domains)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.projection = None
        if config.projection_dim:
            self.projection = nn.Linear(width, config.projection_dim)
            if config.projection_dim == width:  # start as identity so a same-width student begins aligned
                nn.init.eye_(self.projection.weight)
                nn.init.zeros_(self.projection.bias)
        self.post_init()

    def _init_weights(self, module):
        """Weights missing from a checkpoint keep PyTorch's default initialisation (the heads of
        a model built from a pretrained encoder)."""

    @property
    def num_layers(self) -> int:
        return self.encoder.config.num_hidden_layers

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, domain_ids=None, labels=None,
                internals: bool = False, grl_scale: float = 0.0, scores: bool = True, **kwargs) -> MetaKDOutput:
        """``internals``: also every hidden state and, unless ``scores`` is False, every layer's
        pre-softmax attention scores."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        captured: list = []
        handles = []
        if internals and scores:
            handles = [m.register_forward_hook(_capture_scores(captured), with_kwargs=True)
                       for m in self.self_attention()]
        try:
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               output_hidden_states=internals)
        finally:
            for h in handles:
                h.remove()
        content = mean_pool(out.last_hidden_state, attention_mask)
        if self.config.pooling == "mean":
            logits = self.classifier(content)
        else:
            pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]
            logits = self.classifier(torch.relu(pooled))
        if self.config.domain_heads:
            if domain_ids is None:
                raise ValueError("this model has one classifier head per domain (teacher.kind mtl): "
                                 "pass domain_ids to choose the head")
            rows = torch.arange(len(logits), device=logits.device)
            logits = logits.view(len(logits), self.config.num_domains, -1)[rows, domain_ids]
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        domain_logits = pre = None
        if grl_scale or domain_ids is not None:
            if grl_scale:
                # DANN: the head sees the content alone, the encoder receives the reversed gradient.
                branch_in = grad_reverse(content, grl_scale)
            else:
                branch_in = content + self.domain_embedding(domain_ids)
            pre = self.domain_corrupt(branch_in)
            domain_logits = self.domain_classifier(self.dropout(torch.tanh(pre)))
        return MetaKDOutput(loss, logits, domain_logits, pre,
                            out.hidden_states if internals else None, captured if internals and scores else None)

    def self_attention(self) -> list[nn.Module]:
        """The encoder's self-attention modules, layer 1 first."""
        found = [m for m in self.encoder.modules() if _is_self_attention(m)]
        if not found:
            raise ValueError("attention distillation needs a BERT-style encoder (self-attention with query/key)")
        return found


def encoder_config(config: MetaKDConfig):
    encoder = dict(config.encoder)
    return AutoConfig.for_model(encoder.pop("model_type"), **encoder)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, masked: bool = True) -> torch.Tensor:
    """Sentence embedding of the last hidden layer.

    masked:   e(x) = Σ_l m_l·H_l / Σ_l m_l over real tokens (default).
    unmasked: e(x) = mean_{l=1..L-1} H_l, skipping [CLS], padding included (authors' code, §1).
    """
    if masked:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return hidden[:, 1:].mean(1)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by -scale on the way back (DANN's GRL)."""
    return _GradReverse.apply(x, scale)


def _is_self_attention(module) -> bool:
    return all(hasattr(module, a) for a in ("query", "key", "num_attention_heads", "attention_head_size"))


def attention_scores(module, hidden: torch.Tensor) -> torch.Tensor:
    """The pre-softmax scores of a BERT self-attention ``module`` on its input ``hidden`` [B, L, d]:

        A = (h W_Q + b_Q)(h W_K + b_K)ᵀ / √d_head,   [B, heads, L, L]
    """
    b, length, _ = hidden.shape
    shape = (b, length, module.num_attention_heads, module.attention_head_size)
    q = module.query(hidden).view(shape).transpose(1, 2)
    k = module.key(hidden).view(shape).transpose(1, 2)
    return q @ k.transpose(-1, -2) / math.sqrt(module.attention_head_size)


def _capture_scores(sink: list):
    """Forward hook recomputing Q·Kᵀ/√d of a self-attention layer (the pre-softmax scores that
    fused SDPA kernels never materialise), so attention distillation works with any backend."""

    def hook(module, args, kwargs, output):
        sink.append(attention_scores(module, kwargs.get("hidden_states", args[0] if args else None)))

    return hook


AutoConfig.register("metakd", MetaKDConfig, exist_ok=True)
AutoModelForSequenceClassification.register(MetaKDConfig, MetaKDForSequenceClassification, exist_ok=True)
# save_pretrained copies this file into the model directory and names it in config.json's auto_map.
MetaKDConfig.register_for_auto_class()
MetaKDForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
