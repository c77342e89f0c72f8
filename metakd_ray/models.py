"""Building, saving and loading teachers and students (``metakd_ray.modeling`` holds the model).

A saved model is a Hugging Face directory: ``config.json`` (with ``id2label`` and where the model
came from), ``model.safetensors``, the tokenizer (its ``model_max_length`` is the training
``data.max_length``), the model's code, and a model card ``README.md``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from metakd_ray.config import model_path
from metakd_ray.errors import MetaKDError
from metakd_ray.modeling import MetaKDConfig, MetaKDForSequenceClassification

CARD_FILE = "README.md"
FIT_FILE = "fit.safetensors"  # a general-distilled student's W_fit, beside its encoder
# part of every teacher and student cache key: a directory saved in an older layout is retrained
SAVE_FORMAT = "hf-metakd-1"


def load_encoder(path: str, num_layers: int = 0):
    """A Hugging Face encoder with fp32 weights, whatever dtype its checkpoint was saved in
    (transformers 5 would otherwise keep a float16 checkpoint in float16), running the plain torch
    layers: hub kernels (default on from transformers 5.25) would be fetched at run time and re-applied
    at every ``train()``/``eval()``."""
    from transformers import AutoModel

    quiet_transformers()
    kwargs = {"num_hidden_layers": num_layers} if num_layers else {}
    try:
        return AutoModel.from_pretrained(path, dtype=torch.float32, use_kernels=False, **kwargs)
    except Exception as exc:
        raise MetaKDError(f"cannot load model {path!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                          "expected a local Hugging Face model directory, a reachable hub id, or 'minilm'") from None


def quiet_transformers() -> None:
    """No progress bars ("Loading weights", "Writing model shards") and no warnings per dropped
    weight when a layer cut loads: the terminal shows the pipeline's own progress instead."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def wrap_encoder(encoder, labels: list[str], domains: list[str], projection_dim: int = 0,
                 dropout: float = 0.1, pooling: str = "cls", domain_heads: bool = False) -> MetaKDForSequenceClassification:
    """A Meta-KD model around a loaded encoder; the heads start at PyTorch's default initialisation."""
    config = MetaKDConfig(encoder=encoder.config.to_dict(), num_domains=len(domains), projection_dim=projection_dim,
                          classifier_dropout=dropout, pooling=pooling, domain_heads=domain_heads, id2label=dict(enumerate(labels)),
                          label2id={label: i for i, label in enumerate(labels)}, metakd={"domains": list(domains)})
    return MetaKDForSequenceClassification(config, encoder)


def build_teacher(name: str, labels: list[str], domains: list[str], dropout: float = 0.1, pooling: str = "cls",
                  domain_heads: bool = False):
    """A teacher before training; ``domain_heads``: one classifier head per domain (``teacher.kind: mtl``)."""
    return wrap_encoder(load_encoder(model_path(name)), labels, domains, dropout=dropout, pooling=pooling,
                        domain_heads=domain_heads)


def build_student(teacher_name: str, student_init: str, student_layers: int, teacher_width: int,
                  labels: list[str], domains: list[str], dropout: float = 0.1,
                  trained_teacher: Path | None = None, general: Path | None = None,
                  pooling: str = "cls") -> MetaKDForSequenceClassification:
    """The student's starting point (``model.student_init``):

    "" / "pretrained"  the first ``student_layers`` layers of the pretrained teacher checkpoint;
    "teacher"          the first layers and the heads of the trained teacher it distils from (no_kd,
                       which has no teacher, falls back to the pretrained checkpoint);
    "general"          the general-distilled student in ``general`` (``metakd_ray.general``), its
                       W_fit included;
    a path/id          any Hugging Face checkpoint.
    """
    if student_init == "general":
        if general is None:
            raise MetaKDError("model.student_init is 'general' but no general-distilled student was given")
        student = wrap_encoder(load_encoder(str(general / "encoder")), labels, domains,
                               projection_dim=teacher_width, dropout=dropout, pooling=pooling)
        student.projection.load_state_dict(load_file(general / FIT_FILE))
        return student
    if student_init == "teacher" and trained_teacher is not None:
        teacher, _ = load_model(trained_teacher)
        student = wrap_encoder(load_encoder(model_path(teacher_name), student_layers), labels, domains,
                               projection_dim=teacher_width, dropout=dropout, pooling=pooling)
        # the teacher's first layers and heads; its deeper layers have no place in the student, nor
        # do the per-domain heads of an mtl teacher
        own = student.state_dict()
        student.load_state_dict({k: v for k, v in teacher.state_dict().items()
                                 if k in own and own[k].shape == v.shape}, strict=False)
        return student
    if student_init not in ("", "pretrained", "teacher"):
        encoder = load_encoder(model_path(student_init))
    else:
        encoder = load_encoder(model_path(teacher_name), student_layers)
    return wrap_encoder(encoder, labels, domains, projection_dim=teacher_width, dropout=dropout, pooling=pooling)


def save_model(model, directory: Path, meta: dict, tokenizer_from: str | None = None,
               max_length: int | None = None) -> None:
    """Write a Hugging Face directory (weights, config with labels and ``meta``, code, tokenizer)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    quiet_transformers()
    model = getattr(model, "module", model)  # unwrap DDP
    model.config.metakd = dict(model.config.metakd, **meta)
    model.config.encoder = model.encoder.config.to_dict()
    model.save_pretrained(directory)
    if tokenizer_from:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        if max_length:  # pipelines then truncate as training did
            tokenizer.model_max_length = max_length
        tokenizer.save_pretrained(directory)


def load_model(directory: Path) -> tuple[MetaKDForSequenceClassification, dict]:
    """The model of a saved directory (fp32, eval mode) and its ``metakd`` provenance."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise MetaKDError(f"{directory} is not a model directory (no config.json); expected a metakd-ray teacher "
                          "or student directory, e.g. outputs/<name>/students/<method>/<domain>/model")
    quiet_transformers()
    try:
        model = MetaKDForSequenceClassification.from_pretrained(directory, dtype=torch.float32, use_kernels=False)
    except Exception as exc:
        raise MetaKDError(f"cannot load {directory} as a metakd-ray model ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})") from None
    return model.eval(), dict(model.config.metakd)


def count_parameters(model: nn.Module) -> int:
    """Parameters of the encoder (the heads are the same few thousand for teacher and student)."""
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))


def write_model_card(directory: Path, info: dict) -> None:
    """``README.md`` beside the weights: what the model is, how it was made, how well and how fast
    it does, and how to use it. ``info`` is a teacher's or student's result plus its provenance."""
    rows = [(k, info[k]) for k in ("kind", "method", "domain", "teacher", "data", "train_examples", "max_length",
                                   "dev_acc", "test_acc", "params", "compression", "latency_ms", "speedup",
                                   "precision", "device", "mlflow_run_id", "config_hash") if info.get(k) is not None]
    labels = info.get("labels") or []
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-classification", "tags: [metakd-ray, meta-kd]", "---",
        f"# {info.get('title', 'metakd-ray model')}", "",
        info.get("summary", ""), "",
        "| | |", "|---|---|",
        *[f"| {k} | {_card_value(v)} |" for k, v in rows], "",
        f"Labels: {', '.join(labels)}." if labels else "", "",
        "## Use", "", "```python",
        "import metakd_ray.modeling  # registers the model class (or pass trust_remote_code=True without metakd-ray)",
        "from transformers import pipeline", "",
        "classify = pipeline(\"text-classification\", model=\"path/to/this/directory\")",
        "classify([\"An example review.\"], truncation=True)", "```", "",
        "From the command line: `metakd-ray predict path/to/this/directory \"An example review.\"`; "
        "`metakd-ray export path/to/this/directory --onnx --int8` writes ONNX files and a latency/size table.", "",
        "`latency_ms` is the median time to classify one example (batch 1, one CPU thread, fp32, after warm-up).", "",
    ]
    (Path(directory) / CARD_FILE).write_text("\n".join(lines), encoding="utf-8")


def _card_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.1f}"
    if isinstance(value, int) and value > 100_000:
        return f"{value / 1e6:.1f} M"
    return str(value)
