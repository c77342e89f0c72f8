"""General distillation: TinyBERT's task-agnostic first stage, run once before meta-distillation.

    metakd-ray run quickstart            # the quickstart's students start from a general student

With ``model.student_init: general`` the students do not start as a cut of the pretrained teacher
but from a student of any shape (``model.student_layers`` x ``student_hidden``, ``student_heads``,
``student_intermediate``) that learnt to imitate the *pretrained* teacher backbone (not the
fine-tuned meta-teacher; no labels) on the text of every domain's training split, plus
``general.unlabelled_per_domain`` more texts per domain from the rest of its training partition
(the reviews that ``data.max_train_per_domain`` left out; never dev or test):

    L_gen = mean_i [ Σ_{j=0..N_S} hid_ij + Σ_{j=1..N_S} att_ij ]

hid_j matches the student's layer j through W_fit to teacher layer map(j) (j = 0: embeddings),
att_j the attention scores (head-averaged when the student has fewer heads); both are the stage-1
terms of ``metakd_ray.losses``, divided by their targets' mean square with ``distill.term_scale:
target``. Where it starts:

- a student of the teacher's width, heads and FFN size starts as the teacher's first layers (the
  "pretrained" cut) with W_fit = I: general distillation then teaches those layers to produce what
  the teacher's deeper layers produce, which a cut never learnt;
- a narrower student starts as the teacher compressed into its width (``general.narrow_init:
  teacher_layers``, ``start_from_teacher_layers``): the teacher's hidden states in their top
  principal directions, its strongest heads and FFN neurons, W_fit as the projection back. The
  corpus here is thousands of reviews, not Wikipedia, too little for random layers; with
  ``embeddings`` the layers start random and only the embeddings are the teacher's, projected onto
  the top principal directions of its word embeddings.

The result (``<output_dir>/general/<key>/``: ``encoder/``, ``fit.safetensors``, ``result.json``)
depends only on the data, the teacher checkpoint, the student's shape and the ``general`` section,
so every method, student seed, domain and sweep trial shares it. It is one Ray task
(``general.num_cpus`` / ``num_gpus``) with its own MLflow child run and progress lines.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from metakd_ray import losses
from metakd_ray.cluster import init_ray, memory_reservation, prepare_device, task_device
from metakd_ray.config import Config, model_path
from metakd_ray.data.prepare import PreparedData, general_corpus
from metakd_ray.data.split import Split
from metakd_ray.errors import MetaKDError
from metakd_ray.io import atomic_dir, atomic_write_json, content_key, read_json
from metakd_ray.models import FIT_FILE, SAVE_FORMAT, count_parameters, load_encoder, quiet_transformers, wrap_encoder
from metakd_ray.outputs import Store, fetch
from metakd_ray.terminal import relayed_console, say_to
from metakd_ray.tracking import RunRef, flatten, open_run, system_metrics
from metakd_ray.training import TrainingStage, batch_at, eval_batch_size, forward, seed_everything, stage_steps

# texts whose teacher hidden states give a narrow student's principal directions and LayerNorm fits
SAMPLE = 256
SHAPE_KEYS = ("teacher", "student_layers", "student_hidden", "student_heads", "student_intermediate", "layer_map")


def general_key(cfg: Config, data: PreparedData) -> str:
    """What the general student depends on: data, teacher, student shape, the ``general`` section
    (not its resources) and the loss settings it shares with stage 1."""
    model = {k: cfg.to_dict()["model"][k] for k in SHAPE_KEYS}
    settings = {k: v for k, v in cfg.to_dict()["general"].items() if k not in ("num_cpus", "num_gpus")}
    return content_key(data.key, model, settings, cfg.distill.term_scale, cfg.distill.attention_target,
                       cfg.precision, SAVE_FORMAT)[:12]


def general_rel(key: str) -> str:
    return f"general/{key}"


def student_encoder(cfg: Config):
    """The general student's encoder before training: the teacher's first layers when the student
    has the teacher's shape, else a freshly initialised encoder of the student's shape with the
    teacher's architecture and vocabulary."""
    from transformers import AutoConfig, AutoModel

    quiet_transformers()
    config = AutoConfig.from_pretrained(model_path(cfg.model.teacher))
    shape = {"hidden_size": cfg.student_width,
             "num_attention_heads": cfg.model.student_heads or cfg.teacher_arch.heads,
             "intermediate_size": cfg.model.student_intermediate or 4 * cfg.student_width}
    if all(getattr(config, k) == v for k, v in shape.items()):
        return load_encoder(model_path(cfg.model.teacher), cfg.model.student_layers)
    for k, v in dict(shape, num_hidden_layers=cfg.model.student_layers).items():
        setattr(config, k, v)
    return AutoModel.from_config(config)


def principal_directions(rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``width`` principal directions of ``rows`` X [N, D] and their mean:

        x ≈ μ + (x - μ) Pᵀ P,   μ = mean_n X_n,   P = the top ``width`` right singular vectors of (X - μ)

    Returns (P [width, D], μ [D]); (x - μ) Pᵀ are x's coordinates in ``width`` dimensions."""
    mean = rows.mean(0)
    _, _, vh = torch.linalg.svd(rows - mean, full_matrices=False)
    return vh[:width], mean


def principal_embeddings(teacher_weight: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's embedding table E [V, D] in ``width`` dimensions by PCA (``principal_directions``).

    Returns ((E - μ) Pᵀ  [V, width], P [width, D], μ [D]); a linear map x -> x P + μ takes the
    student's rows back to the teacher's space (W_fit's starting point)."""
    basis, mean = principal_directions(teacher_weight, width)
    return (teacher_weight - mean) @ basis.T, basis, mean


def fit_layer_norm(inputs: torch.Tensor, targets: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The LayerNorm scale γ and shift β that best map ``inputs`` [N, w] to ``targets`` [N, w]:

        n = (x - mean_d x) / sqrt(var_d x + eps)                  (what the LayerNorm makes of a row x)
        γ_d = cov_N(n_d, y_d) / var_N(n_d),   β_d = mean_N(y_d) - γ_d · mean_N(n_d)

    per dimension d, the least-squares fit of y_d by γ_d n_d + β_d over the N rows."""
    normed = (inputs - inputs.mean(-1, keepdim=True)) / torch.sqrt(inputs.var(-1, unbiased=False, keepdim=True) + eps)
    n_mean, y_mean = normed.mean(0), targets.mean(0)
    gamma = ((normed - n_mean) * (targets - y_mean)).mean(0) / (normed - n_mean).pow(2).mean(0).clamp(min=1e-12)
    return gamma, y_mean - gamma * n_mean


def can_compress(student_config, teacher_config) -> bool:
    """Whether ``start_from_teacher_layers`` applies: the student keeps the teacher's head size and
    has no more heads or FFN neurons than it (a BERT-style encoder)."""
    head = teacher_config.hidden_size // teacher_config.num_attention_heads
    return (getattr(teacher_config, "model_type", "") in ("bert", "roberta", "xlm-roberta", "electra")
            and student_config.hidden_size // student_config.num_attention_heads == head
            and student_config.num_attention_heads <= teacher_config.num_attention_heads
            and student_config.intermediate_size <= teacher_config.intermediate_size)


def _strongest(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values


@torch.no_grad()
def start_from_teacher_layers(student, teacher, sample: dict, layer_map: list[int]) -> None:
    """A narrower student as the teacher compressed into its width, before general distillation.

    The student's hidden state is the teacher's in the top ``width`` principal directions P of the
    teacher's hidden states on ``sample`` (every layer, real tokens): h_S = (h_T - μ) Pᵀ, h_T ≈ h_S P + μ.
    Student layer j is teacher layer map(j) seen through P:

    - embeddings: the teacher's word, position and type tables times Pᵀ;
    - maps that read the hidden state (query, key, value, FFN in): W[r] Pᵀ with bias b[r] + W[r] μ, over
      the teacher's heads / FFN neurons r with the largest ‖W_in[r]‖·‖W_out[:, r]‖, as many as the
      student has;
    - maps that write it (attention out, FFN out): P W[:, r] with bias P b;
    - every LayerNorm: γ, β fitted to the teacher's on ``sample`` through P (``fit_layer_norm``);
    - W_fit: x -> x P + μ, the map back.

    Random layers learn little from thousands of reviews; these start with the teacher's attention
    patterns and features. ``can_compress`` says when it applies."""
    t_enc, s_enc = teacher.encoder, student.encoder
    inputs = {"input_ids": sample["input_ids"], "attention_mask": sample["attention_mask"],
              "token_type_ids": sample["token_type_ids"]}
    real = sample["attention_mask"].bool()
    t_layers = [t_enc.encoder.layer[j - 1] for j in layer_map]
    s_layers = list(s_enc.encoder.layer)
    norms = [(t_enc.embeddings.LayerNorm, s_enc.embeddings.LayerNorm)]
    for t, s in zip(t_layers, s_layers):
        norms += [(t.attention.output.LayerNorm, s.attention.output.LayerNorm),
                  (t.output.LayerNorm, s.output.LayerNorm)]
    seen = {}
    hooks = [t.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, (i[0][real], o[real])))
             for k, (t, _) in enumerate(norms)]
    try:
        states = t_enc(**inputs, output_hidden_states=True).hidden_states
    finally:
        for hook in hooks:
            hook.remove()
    basis, mean = principal_directions(torch.cat([h[real] for h in states]).float(), s_enc.config.hidden_size)

    def reads(s_lin, t_lin, rows):
        s_lin.weight.copy_(t_lin.weight[rows] @ basis.T)
        s_lin.bias.copy_(t_lin.bias[rows] + t_lin.weight[rows] @ mean)

    def writes(s_lin, t_lin, cols):
        s_lin.weight.copy_(basis @ t_lin.weight[:, cols])
        s_lin.bias.copy_(basis @ t_lin.bias)

    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        getattr(s_enc.embeddings, name).weight.copy_(getattr(t_enc.embeddings, name).weight @ basis.T)
    size = t_enc.config.hidden_size // t_enc.config.num_attention_heads
    for t, s in zip(t_layers, s_layers):
        att = t.attention
        heads = [slice(h * size, (h + 1) * size) for h in range(t_enc.config.num_attention_heads)]
        importance = torch.stack([att.self.value.weight[h].norm() * att.output.dense.weight[:, h].norm()
                                  for h in heads])
        rows = torch.cat([torch.arange(heads[h].start, heads[h].stop, device=importance.device)
                          for h in _strongest(importance, s_enc.config.num_attention_heads)])
        for name in ("query", "key", "value"):
            reads(getattr(s.attention.self, name), getattr(att.self, name), rows)
        writes(s.attention.output.dense, att.output.dense, rows)
        neurons = _strongest(t.intermediate.dense.weight.norm(dim=1) * t.output.dense.weight.norm(dim=0),
                             s.intermediate.dense.out_features)
        reads(s.intermediate.dense, t.intermediate.dense, neurons)
        writes(s.output.dense, t.output.dense, neurons)
    for k, (_, s_norm) in enumerate(norms):
        x, y = seen[k]
        # the embedding sum is projected without centring (its tables are); a layer's input is a hidden state
        x = x @ basis.T if k == 0 else (x - mean) @ basis.T
        gamma, beta = fit_layer_norm(x.float(), ((y - mean) @ basis.T).float(), s_norm.eps)
        s_norm.weight.copy_(gamma)
        s_norm.bias.copy_(beta)
    student.projection.weight.copy_(basis.T)
    student.projection.bias.copy_(mean)


def start_from_teacher_embeddings(student, teacher) -> None:
    """Student embeddings (word, position, type) := the teacher's in the top principal directions
    of its word embeddings; W_fit := the map back (``principal_embeddings``)."""
    width = student.encoder.config.hidden_size
    t_emb, s_emb = teacher.encoder.embeddings, student.encoder.embeddings
    words, basis, mean = principal_embeddings(t_emb.word_embeddings.weight.detach(), width)
    with torch.no_grad():
        s_emb.word_embeddings.weight.copy_(words)
        for name in ("position_embeddings", "token_type_embeddings"):
            getattr(s_emb, name).weight.copy_(getattr(t_emb, name).weight.detach() @ basis.T)
        student.projection.weight.copy_(basis.T)
        student.projection.bias.copy_(mean)


def general_distill(cfg: Config, data: PreparedData, device: torch.device | None = None, run: RunRef | None = None,
                    say=print, texts: Split | None = None) -> dict:
    """Train the general student on ``device`` over ``texts`` (default: ``general_corpus``); returns
    {"model", "result"} (plain PyTorch: no Ray)."""
    gcfg = cfg.general
    device = device or torch.device("cpu")
    seed_everything(gcfg.seed)
    teacher = wrap_encoder(load_encoder(model_path(cfg.model.teacher)), data.labels, data.domains).to(device).eval()
    student = wrap_encoder(student_encoder(cfg), data.labels, data.domains, projection_dim=cfg.teacher_arch.width,
                           dropout=cfg.model.dropout)
    texts = general_corpus(cfg, data) if texts is None else texts  # the labels are never read
    if student.encoder.config.hidden_size != teacher.encoder.config.hidden_size:
        if gcfg.narrow_init == "teacher_layers" and can_compress(student.encoder.config, teacher.encoder.config):
            sample = batch_at(texts, torch.linspace(0, len(texts) - 1, min(len(texts), SAMPLE)).long().numpy(), device)
            start_from_teacher_layers(student, teacher, sample, cfg.layer_map)
            say(f"[general] the student starts as the teacher's layers {cfg.layer_map} compressed to "
                f"{cfg.student_width} dimensions (general.narrow_init: teacher_layers)")
        else:
            if gcfg.narrow_init == "teacher_layers":
                say("[general] the student's layers start random: compressing the teacher's needs its head size "
                    f"({cfg.teacher_arch.width // cfg.teacher_arch.heads}), no more heads or FFN neurons than it has, "
                    "and a BERT-style encoder")
            start_from_teacher_embeddings(student, teacher)
    student.to(device)
    layers = [0] + cfg.layer_map
    scale = cfg.distill.term_scale == "target"

    def terms(b, out):
        with torch.no_grad():
            t = forward(teacher, b, internals=True)
        mask = b["attention_mask"]
        s_attn, t_attn = losses.attention_pair(out.attention_scores, [t.attention_scores[j - 1] for j in layers[1:]],
                                               mask, cfg.distill.attention_target)
        hidden = losses.hidden_mse(list(out.hidden_states), [t.hidden_states[j] for j in layers], student.projection,
                                   mask, scale)
        return hidden, losses.attention_mse(s_attn, t_attn, mask, scale)

    def loss_fn(b, idx, out):
        hidden, attention = terms(b, out)
        return (hidden + attention).mean(), {"hidden": hidden.detach().mean(), "attention": attention.detach().mean()}

    started, last_said = time.time(), [0.0]
    total = stage_steps(gcfg.epochs, len(texts), gcfg.batch_size)

    def progress(step):
        if time.time() - last_said[0] >= 20 or step == total:
            last_said[0] = time.time()
            elapsed = time.time() - started
            say(f"[general] step {step}/{total} · {elapsed:.0f}s elapsed, about "
                f"{elapsed / step * (total - step):.0f}s left")

    stage = TrainingStage(student, texts, gcfg, gcfg.seed, cfg.precision, run, device, progress)
    steps = stage(gcfg.epochs, gcfg.lr, 0, "general", loss_fn, internals=True)
    dev_loss = _held_out_loss(student, data, terms, device)
    if run:
        run.log_metrics({"dev/loss": dev_loss}, steps)
    result = {"steps": steps, "train_examples": len(texts), "dev_loss": dev_loss, "params": count_parameters(student),
              "teacher_params": count_parameters(teacher), "train_seconds": round(time.time() - started, 1),
              "device": device.type}
    return {"model": student.cpu(), "result": result}


@torch.no_grad()
def _held_out_loss(student, data: PreparedData, terms, device) -> float:
    """L_gen on the dev splits' text (never trained on): how well the imitation generalises."""
    student.eval()
    dev = data.splits["dev"]
    n, size = len(dev), eval_batch_size(device)
    total = 0.0
    for start in range(0, n, size):
        b = batch_at(dev, np.arange(start, min(start + size, n)), device)
        hidden, attention = terms(b, forward(student, b, internals=True))
        total += float((hidden + attention).sum())
    return total / max(1, n)


def save_general(model, directory: Path) -> None:
    model.encoder.save_pretrained(directory / "encoder")
    save_file({k: v.contiguous() for k, v in model.projection.state_dict().items()}, directory / FIT_FILE)


# --------------------------------------------------------------------------- Ray and MLflow edges


def _general_task(cfg: Config, data: PreparedData, texts: Split, run: RunRef, console) -> dict:
    """Ray task body: train the general student on the GPU Ray gave the task (else the CPU);
    return its files for the driver to write."""
    torch.set_num_threads(cfg.general.num_cpus)
    device = task_device()
    prepare_device(device)
    with system_metrics(run):
        out = general_distill(cfg, data, device, run, say_to(console), texts)
    with tempfile.TemporaryDirectory() as tmp:
        save_general(out["model"], Path(tmp))
        files = {p.relative_to(tmp).as_posix(): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()}
    return {"result": out["result"], "files": files}


def ensure_general(cfg: Config, data: PreparedData, parent: RunRef | None) -> dict:
    """The general student of ``cfg`` (trained now unless a finished one of the same key exists
    here or in ``ray.storage_path``); returns its ``result.json``."""
    import ray

    key = general_key(cfg, data)
    found = fetch(cfg, general_rel(key), key)
    if found:
        done = read_json(found / "result.json")
        print(f"[general] reusing the general-distilled student {key} ({done['params'] / 1e6:.1f} M parameters)",
              flush=True)
        return done
    init_ray(cfg)
    gcfg = cfg.general
    run = open_run(cfg, f"general/{key}", "general-student", "general", parent)
    settings = cfg.to_dict()
    run.log_params(flatten({"general": settings["general"], "model": {k: settings["model"][k] for k in SHAPE_KEYS},
                            "term_scale": cfg.distill.term_scale}))
    texts = general_corpus(cfg, data)
    extra = len(texts) - len(data.splits["train"])
    print(f"[general] distilling the pretrained {cfg.model.teacher} into a {cfg.model.student_layers}-layer, "
          f"{cfg.student_width}-wide student on {len(data.splits['train'])} training texts"
          f"{f' and {extra} more from the training partitions' if extra else ''} (labels unused), "
          f"{gcfg.epochs:g} epoch(s)", flush=True)
    task = ray.remote(_general_task).options(num_cpus=gcfg.num_cpus, num_gpus=gcfg.num_gpus,
                                             memory=memory_reservation(cfg, "general"),
                                             max_retries=cfg.distill.max_retries, retry_exceptions=True)
    # the task reads the corpus and the dev text (its held-out loss), not the test split
    shipped = dataclasses.replace(data, splits={"dev": data.splits["dev"]}, transfer={})
    try:
        with relayed_console() as console:
            out = ray.get(task.remote(cfg, shipped, texts, run, console))
    except Exception:
        run.fail()
        raise
    result = dict(out["result"], key=key, run_id=run.run_id)
    directory = cfg.out / general_rel(key)
    with atomic_dir(directory) as tmp:
        for name, blob in out["files"].items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(blob)
        atomic_write_json(tmp / "result.json", result)
    run.log_metrics({"params": result["params"], "compression": result["teacher_params"] / result["params"]})
    run.finish()
    store = Store.of(cfg)
    if store:
        store.put(directory, general_rel(key))
    print(f"[general] done: {result['steps']} steps in {result['train_seconds']:.0f}s, held-out loss "
          f"{result['dev_loss']:.3f}, {result['params'] / 1e6:.1f} M parameters "
          f"({result['teacher_params'] / result['params']:.1f}x fewer than the teacher)", flush=True)
    return result


def general_path(cfg: Config, key: str) -> Path:
    """The general student of ``key`` on this node (for a student task)."""
    found = fetch(cfg, general_rel(key), key)
    if found is None:
        raise MetaKDError(f"general-distilled student {key} is not on this node ({cfg.out / general_rel(key)}) "
                          f"nor in ray.storage_path ({cfg.ray.storage_path or 'unset'}); on a multi-node cluster set "
                          "ray.storage_path, and in a sweep do not vary the student's shape or the general section")
    return found
