"""Teacher and student: a Hugging Face encoder + classifier head + Meta-KD domain branch.

    z      = W_cls · ReLU(pool(x)) + b                         (classifier)
    c(x)   = masked mean of the last hidden layer               (content vector)
    pre    = W_c (c(x) + E_D[k]) + b                            (domain vector h_d, taken pre-tanh)
    g      = Dropout(tanh(pre)),  domain_logits = W_d g + b_d    (domain branch)

The domain vector that students match is taken before the tanh and without dropout, so the MSE
target is deterministic and not squashed. The student is the same module on fewer layers, plus one
projection W_fit to the teacher's width (identity-initialised when the widths match) shared by the
hidden states and the domain vector. Checkpoints are a Hugging Face directory (``config.json`` + ``model.safetensors`` +
tokenizer) with the heads in ``metakd_heads.safetensors`` and ``metakd.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from metakd_ray.config import model_path
from metakd_ray.errors import MetaKDError
from metakd_ray.losses import grad_reverse
from metakd_ray.scores import mean_pool

HEADS_FILE = "metakd_heads.safetensors"
META_FILE = "metakd.json"


@dataclass
class Outputs:
    logits: torch.Tensor  # [B, C]
    domain_logits: torch.Tensor  # [B, K]
    domain_vector: torch.Tensor  # [B, d] pre-tanh, no dropout
    hidden_states: tuple | None = None  # (embeddings, layer 1, ..., layer N), each [B, L, d]
    attention_scores: list | None = None  # per layer [B, heads, L, L], pre-softmax, unmasked


class MetaKDModel(nn.Module):
    def __init__(self, encoder, num_labels: int, num_domains: int, projection_dim: int = 0, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        width = encoder.config.hidden_size
        self.classifier = nn.Linear(width, num_labels)
        self.domain_embedding = nn.Embedding(num_domains, width)
        self.domain_corrupt = nn.Linear(width, width)
        self.domain_classifier = nn.Linear(width, num_domains)
        self.dropout = nn.Dropout(dropout)
        self.projection = None
        if projection_dim:
            self.projection = nn.Linear(width, projection_dim)
            if projection_dim == width:  # start as identity so a same-width student begins aligned
                nn.init.eye_(self.projection.weight)
                nn.init.zeros_(self.projection.bias)
        self._attention_modules = [m for m in encoder.modules() if _is_self_attention(m)]

    @property
    def num_layers(self) -> int:
        return self.encoder.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, token_type_ids, domain_ids,
                internals: bool = False, grl_scale: float = 0.0) -> Outputs:
        scores: list = []
        handles = []
        if internals:
            if not self._attention_modules:
                raise MetaKDError("attention distillation needs a BERT-style encoder (self-attention with query/key)")
            handles = [m.register_forward_hook(_capture_scores(scores), with_kwargs=True)
                       for m in self._attention_modules]
        try:
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               output_hidden_states=internals)
        finally:
            for h in handles:
                h.remove()
        pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]
        logits = self.classifier(torch.relu(pooled))
        content = mean_pool(out.last_hidden_state, attention_mask)
        if grl_scale:
            # DANN: the head sees the content alone, the encoder receives the reversed gradient.
            branch_in = grad_reverse(content, grl_scale)
        else:
            branch_in = content + self.domain_embedding(domain_ids)
        pre = self.domain_corrupt(branch_in)
        domain_logits = self.domain_classifier(self.dropout(torch.tanh(pre)))
        return Outputs(logits, domain_logits, pre,
                       out.hidden_states if internals else None, scores if internals else None)


def _is_self_attention(module) -> bool:
    return all(hasattr(module, a) for a in ("query", "key", "num_attention_heads", "attention_head_size"))


def _capture_scores(sink: list):
    """Forward hook recomputing Q·Kᵀ/√d of a self-attention layer (the pre-softmax scores that
    fused SDPA kernels never materialise), so attention distillation works with any backend."""

    def hook(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        b, length, _ = hidden.shape
        shape = (b, length, module.num_attention_heads, module.attention_head_size)
        q = module.query(hidden).view(shape).transpose(1, 2)
        k = module.key(hidden).view(shape).transpose(1, 2)
        sink.append(q @ k.transpose(-1, -2) / math.sqrt(module.attention_head_size))

    return hook


# --------------------------------------------------------------------------- building and loading


def load_encoder(path: str, num_layers: int = 0):
    """A Hugging Face encoder with fp32 weights, whatever dtype its checkpoint was saved in
    (transformers 5 would otherwise keep a float16 checkpoint in float16)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # a layer cut reports every dropped weight as "unexpected"
    kwargs = {"num_hidden_layers": num_layers} if num_layers else {}
    try:
        return AutoModel.from_pretrained(path, dtype=torch.float32, **kwargs)
    except Exception as exc:
        raise MetaKDError(f"cannot load model {path!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                          "expected a local Hugging Face model directory, a reachable hub id, or 'minilm'") from None


def build_teacher(name: str, num_labels: int, num_domains: int, dropout: float = 0.1) -> MetaKDModel:
    return MetaKDModel(load_encoder(model_path(name)), num_labels, num_domains, dropout=dropout)


def build_student(teacher_name: str, student_init: str, student_layers: int, teacher_width: int,
                  num_labels: int, num_domains: int, dropout: float = 0.1,
                  trained_teacher: Path | None = None) -> MetaKDModel:
    """The student's starting point (``model.student_init``):

    ""          the first ``student_layers`` layers of the pretrained teacher checkpoint;
    "teacher"   the first layers and the heads of the trained teacher it distils from (no_kd,
                which has no teacher, falls back to the pretrained checkpoint);
    a path/id   any Hugging Face checkpoint.
    """
    if student_init == "teacher" and trained_teacher is not None:
        encoder = load_encoder(str(trained_teacher), student_layers)
        student = MetaKDModel(encoder, num_labels, num_domains, projection_dim=teacher_width, dropout=dropout)
        student.load_state_dict(load_file(Path(trained_teacher) / HEADS_FILE), strict=False)
        return student
    if student_init and student_init != "teacher":
        encoder = load_encoder(model_path(student_init))
    else:
        encoder = load_encoder(model_path(teacher_name), student_layers)
    return MetaKDModel(encoder, num_labels, num_domains, projection_dim=teacher_width, dropout=dropout)


def save_model(model: MetaKDModel, directory: Path, meta: dict, tokenizer_from: str | None = None) -> None:
    """Write a Hugging Face directory (encoder + tokenizer) plus the Meta-KD heads (safetensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    model.encoder.save_pretrained(directory)
    heads = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    save_file(heads, directory / HEADS_FILE)
    info = dict(meta, num_labels=model.classifier.out_features, num_domains=model.domain_classifier.out_features,
                projection_dim=model.projection.out_features if model.projection is not None else 0)
    (directory / META_FILE).write_text(json.dumps(info, indent=2))
    if tokenizer_from:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(directory)


def load_model(directory: Path) -> tuple[MetaKDModel, dict]:
    directory = Path(directory)
    if not (directory / META_FILE).is_file():
        raise MetaKDError(f"{directory} is not a metakd-ray model directory (no {META_FILE})")
    info = json.loads((directory / META_FILE).read_text())
    model = MetaKDModel(load_encoder(str(directory)), info["num_labels"], info["num_domains"],
                        projection_dim=info.get("projection_dim", 0), dropout=info.get("dropout", 0.1))
    model.load_state_dict(load_file(directory / HEADS_FILE), strict=False)
    return model, info


def count_parameters(model: nn.Module) -> int:
    """Parameters of the encoder (the heads are the same few thousand for teacher and student)."""
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))
