"""Device placement and precision, checked on a CPU-only machine.

Every training, evaluation and teacher-pass path is run with an explicit device. PyTorch's
``meta`` device stands in for a GPU, and ``DeviceAudit`` watches every torch call: one that is given
tensors on two devices (a CPU batch meeting a model on the device) fails the test, exactly where a
CUDA run would fail with "Expected all tensors to be on the same device". Meta tensors hold no
data, so a device-clean path runs every step on meta and stops only where it copies a result
back to the CPU ("Cannot copy out of meta tensor"): after its forward passes, losses, backward
and optimiser steps.
"""

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from metakd_ray.config import load_config
from metakd_ray.data.prepare import prepare
from metakd_ray.distill import StudentJob, distill_student, domain_data
from metakd_ray.models import build_teacher, load_encoder, save_model
from metakd_ray.prototypes import compute_prototype_scores, embed
from metakd_ray.signals import TeacherSignals, teacher_pass
from metakd_ray.teacher import loop_settings, train_step
from metakd_ray.training import accuracy_by_domain, batch_at, make_optimizer

META = torch.device("meta")
COPY_BACK = "Cannot copy out of meta tensor"
# Moving a tensor or a module between devices (Module.to checks the copy type first).
MOVES = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cpu, torch._has_compatible_shallow_copy_type}


class MixedDevices(AssertionError):
    pass


class DeviceAudit(TorchFunctionMode):
    """Fails any torch call (other than a move) whose tensor arguments live on different devices.
    0-dim tensors are left out: PyTorch itself lets a CPU scalar meet a GPU tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in MOVES:
            devices = {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()}
            if len(devices) > 1:
                raise MixedDevices(f"{getattr(func, '__qualname__', func)} got tensors on {sorted(devices)}")
        return func(*args, **kwargs)


@pytest.fixture(autouse=True)
def no_mask_shortcut(monkeypatch):
    """transformers skips building the SDPA mask when a batch has no padding, a check that reads a
    tensor's value (impossible on meta). Building the mask always gives the same attention."""
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "_ignore_bidirectional_mask_sdpa", lambda *args, **kwargs: False)


def _reaches_copy_back(fn):
    """Run ``fn`` under the audit; it must get all the way to copying a result back to the CPU."""
    with pytest.raises(NotImplementedError, match=COPY_BACK):
        with DeviceAudit():
            fn()


def test_the_audit_catches_a_cpu_batch_fed_to_a_model_on_the_device():
    layer = torch.nn.Linear(4, 2).to(META)
    with pytest.raises(MixedDevices, match="cpu"):
        with DeviceAudit():
            layer(torch.ones(1, 4))


@pytest.fixture
def prepared(tiny_config):
    cfg = load_config(str(tiny_config()))
    data = prepare(cfg, quiet=True)
    scores = compute_prototype_scores(cfg, data, quiet=True)
    return cfg, data, scores


def test_teacher_step_runs_on_the_models_device(prepared):
    cfg, data, scores = prepared
    model = build_teacher(cfg.model.teacher, data.labels, data.domains).to(META)
    settings = loop_settings(cfg, data, "meta")
    optimizer, scheduler = make_optimizer(model, 1e-4, 0.01, 10, 0.1)
    train = data.splits["train"]
    weights = torch.tensor(scores)
    index = np.arange(8)
    for kind in ("shuffled", "grl", "uniform"):
        with DeviceAudit():
            loss, ce, domain = train_step(model, optimizer, scheduler, batch_at(train, index, META),
                                          weights[index].to(META), dict(settings, domain_loss=kind), 0, 0)
        assert loss.device == META and ce.shape == (8,) and domain.shape == (8,)


def test_evaluation_moves_batches_to_the_model(prepared):
    cfg, data, _ = prepared
    model = build_teacher(cfg.model.teacher, data.labels, data.domains).to(META)
    _reaches_copy_back(lambda: accuracy_by_domain(model, data.splits["dev"], data.domains))


def test_teacher_pass_runs_on_the_teachers_device(prepared, tmp_path):
    cfg, data, scores = prepared
    teacher = build_teacher(cfg.model.teacher, data.labels, data.domains).to(META)
    dd = domain_data(cfg, data, "books", scores)
    _reaches_copy_back(lambda: teacher_pass(cfg, dd.rows(), dd.row_scores(), teacher, True, tmp_path / "t"))


def test_prototype_embedding_runs_on_the_given_device(prepared):
    cfg, data, _ = prepared
    _reaches_copy_back(lambda: embed(cfg, data.splits["train"], quiet=True, device=META))


@pytest.mark.parametrize("method, cached", [("meta_kd", True), ("meta_kd", False), ("no_kd", False)])
def test_student_trains_on_its_device(prepared, tmp_path, method, cached):
    """Stage 1 and the first stage-2 steps (cached or live teacher internals, λ, soft labels) run on
    meta; the first dev evaluation then copies predictions back."""
    cfg, data, scores = prepared
    teacher = build_teacher(cfg.model.teacher, data.labels, data.domains)
    save_model(teacher, tmp_path / "teacher", {"kind": "meta"})
    dd, signals = domain_data(cfg, data, "books", scores), None
    if method != "no_kd":
        teacher_pass(cfg, dd.rows(), dd.row_scores(), teacher, cached, tmp_path / "t")
        signals = TeacherSignals(tmp_path / "t")
    job = StudentJob(method, "books")
    _reaches_copy_back(lambda: distill_student(cfg, dd, job, tmp_path / "teacher", signals, device=META))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_trains_in_fp32(prepared, tmp_path, dtype):
    """Published checkpoints often record float16; weights must still load as fp32 master weights."""
    cfg, data, _ = prepared
    from transformers import AutoTokenizer

    half = tmp_path / "half"
    load_encoder(cfg.model.teacher).to(dtype).save_pretrained(half)
    AutoTokenizer.from_pretrained(cfg.model.teacher).save_pretrained(half)
    assert load_encoder(str(half)).embeddings.word_embeddings.weight.dtype == torch.float32
    cfg = load_config(str(tmp_path / "config.yaml"), [f"model.teacher={half}", f"output_dir={tmp_path}/o"])
    data = prepare(cfg, quiet=True)
    scores = compute_prototype_scores(cfg, data, quiet=True)  # crashed with a dtype mismatch before
    assert len(scores) == len(data.splits["train"])
    r = distill_student(cfg, domain_data(cfg, data, "books", scores), StudentJob("no_kd", "books"), None, None,
                        log=lambda *_: None)["result"]
    assert r["precision"] == "fp32" and 0.0 <= r["test_acc"] <= 1.0


def test_precision_auto_is_fp32_on_cpu_and_bad_values_are_named(prepared, capsys):
    from metakd_ray.cli import main
    from metakd_ray.cluster import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert main(["validate", "quickstart", "precision=fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "precision" in err[0] and "bf16" in err[0]


def test_bf16_teacher_and_student_steps_run_on_a_cpu(prepared, tmp_path):
    """precision=bf16 is autocast on a CPU too: a teacher step and a student (both stages, cached
    hidden states) train there, their forward passes in bfloat16 and their weights fp32."""
    from metakd_ray.cluster import autocast
    from metakd_ray.training import forward

    cfg, data, scores = prepared
    model = build_teacher(cfg.model.teacher, data.labels, data.domains)
    settings = dict(loop_settings(cfg, data, "meta"), precision="bf16")
    optimizer, scheduler = make_optimizer(model, 1e-4, 0.01, 10, 0.1)
    index = np.arange(8)
    b = batch_at(data.splits["train"], index)
    before = model.classifier.weight.detach().clone()
    loss, _, _ = train_step(model, optimizer, scheduler, b, torch.tensor(scores[index]), settings, 0, 0)
    assert torch.isfinite(loss) and not torch.equal(before, model.classifier.weight)
    assert model.classifier.weight.dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert forward(model, b).logits.dtype == torch.bfloat16

    cfg.precision = "bf16"
    save_model(model, tmp_path / "teacher", {"kind": "meta"})
    dd = domain_data(cfg, data, "books", scores)
    teacher_pass(cfg, dd.rows(), dd.row_scores(), model, True, tmp_path / "t")
    out = distill_student(cfg, dd, StudentJob("meta_kd", "books"), tmp_path / "teacher", TeacherSignals(tmp_path / "t"),
                          log=lambda *_: None)
    assert out["result"]["precision"] == "bf16" and out["result"]["steps"] == 12
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in out["model"].parameters())
