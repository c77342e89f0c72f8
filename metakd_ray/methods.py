"""The distillation methods: one row each, read by config validation, the pipeline, the CLI, the
report and the sweep. Adding a method is adding a row here (and, if it needs a new loss, a term in
``distill.distill_student``).

A student of method m for target domain k learns from the teacher of kind ``m.teacher_kind``:

    stage 1:  L_1 = mean_i[λ_i (hidn_i + attn_i)] + γ2·mean(λ)·tkd
              λ_i = expertise weight if m.use_lambda else 1;   γ2 = distill.domain_weight if
              m.domain_term else 0
    stage 2:  L_2 = mean_i soft_CE(z^S_i, z^T_i; τ)

``no_kd`` has no teacher: the student is fine-tuned on the hard labels alone. A multi-teacher
method (``mtn_kd``, the paper's "Multi-teachers → MTN-KD" row, whose exact method the paper leaves
open) learns stage 1 from the target domain's own single-domain teacher, as tinybert_kd(single)
does, and stage 2 from the average of the soft labels of all K single-domain teachers
(``losses.averaged_soft_labels``).
"""

from __future__ import annotations

from dataclasses import dataclass

TEACHER_KINDS = ("meta", "mix", "mtl", "single")


@dataclass(frozen=True)
class Method:
    name: str  # as in results.json and the paper's table
    alias: str  # shell-safe, accepted wherever a method is named; also the MLflow metric suffix
    teacher_kind: str  # "" = trained on labels, no teacher
    use_lambda: bool  # weight instances by the teacher's domain expertise λ
    domain_term: bool  # add γ2 · the transferable-knowledge (domain vector) loss to stage 1
    summary: str
    multi_teacher: bool = False  # stage 2 from the averaged soft labels of every domain's teacher

    @property
    def distils(self) -> bool:
        return bool(self.teacher_kind)

    @property
    def teacher_row(self) -> str:
        """The report row of the teacher this method distils from ("" for no_kd)."""
        return f"teacher {self.teacher_kind}" if self.teacher_kind else ""


METHODS = {m.name: m for m in (
    Method("meta_kd", "meta-kd", "meta", True, True, "Meta-KD: λ-weighted distillation from the meta-teacher"),
    Method("no_kd", "no-kd", "", False, False, "the student trained on labels alone"),
    Method("tinybert_kd(meta)", "tinybert-meta", "meta", False, False, "TinyBERT-KD from the meta-teacher"),
    Method("tinybert_kd(mix)", "tinybert-mix", "mix", False, False,
           "TinyBERT-KD from a teacher trained on all domains mixed"),
    Method("tinybert_kd(mtl)", "tinybert-mtl", "mtl", False, False,
           "TinyBERT-KD from a multi-task teacher (shared encoder, one head per domain)"),
    Method("tinybert_kd(single)", "tinybert-single", "single", False, False,
           "TinyBERT-KD from the target domain's own teacher"),
    Method("mtn_kd", "mtn-kd", "single", False, False,
           "multi-teacher KD: the K single-domain teachers' soft labels averaged", multi_teacher=True),
)}
ALIASES = {m.alias: m for m in METHODS.values()}
META_KD = METHODS["meta_kd"]


def method(name: str, where: str = "", also: str = "") -> Method:
    """The row of ``name`` or of its alias; an unknown name is one error line naming ``where`` it
    came from and the choices (``also`` adds one, e.g. 'all' on the command line)."""
    from metakd_ray.errors import MetaKDError, did_you_mean

    found = METHODS.get(name) or ALIASES.get(name)
    if found is None:
        choices = f"{also} or some of" if also else "some of"
        raise MetaKDError(f"{where + ': ' if where else ''}unknown method {name!r}"
                          f"{did_you_mean(name, list(METHODS) + list(ALIASES))} "
                          f"(expected {choices}: {', '.join(f'{m.name} ({m.alias})' for m in METHODS.values())})")
    return found


def methods_help() -> str:
    """One line per method, for ``--help``."""
    return "\n".join(f"  {m.alias:<16} {m.name:<20} {m.summary}" for m in METHODS.values())


def methods_from(kind: str) -> list[str]:
    """The methods that distil from a teacher of ``kind``."""
    return [m.name for m in METHODS.values() if m.teacher_kind == kind]


def teacher_name(kind: str, domain: str = "") -> str:
    """Directory and run name of a teacher: its kind, or ``single-<domain>`` for per-domain teachers."""
    return f"single-{domain}" if kind == "single" else kind
