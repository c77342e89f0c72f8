"""Meta-distillation: the plain-PyTorch student loop, the teacher-output cache, the Ray fan-out,
results.json against MLflow, and a killed driver that resumes only the missing domains."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from transformers import pipeline

from conftest import kill_when, noise_lines

from metakd_ray import losses

from metakd_ray.config import load_config
from metakd_ray.data.prepare import prepare
from metakd_ray.data.split import read_split
from metakd_ray.distill import StudentJob, distill_student, domain_data
from metakd_ray.modeling import attention_scores, mean_pool
from metakd_ray.models import build_student, build_teacher, load_model, save_model
from metakd_ray.prototypes import compute_prototype_scores
from metakd_ray.signals import CachedTargets, LiveTargets, TeacherSignals, stored_layers, teacher_pass
from metakd_ray.training import batch_at


@pytest.fixture
def prepared(tiny_config):
    cfg = load_config(str(tiny_config()))
    data = prepare(cfg, quiet=True)
    scores = compute_prototype_scores(cfg, data, quiet=True)
    teacher = build_teacher(cfg.model.teacher, data.labels, data.domains)
    return cfg, data, scores, teacher


def teacher_signals(cfg, data, scores, teacher, domain, internals, path):
    """The teacher's pass over ``domain``'s student rows, as the pipeline's task makes it."""
    dd = domain_data(cfg, data, domain, scores)
    teacher_pass(cfg, dd.rows(), dd.row_scores(), teacher, internals, path)
    return dd, TeacherSignals(path)


def test_cached_teacher_outputs_match_a_live_teacher(prepared, tmp_path):
    cfg, data, scores, teacher = prepared
    dd, cached = teacher_signals(cfg, data, scores, teacher, "books", True, tmp_path / "t")
    rows = dd.rows()
    n = len(rows)
    soft = cached.soft(np.arange(n))
    assert soft["logits"].shape == (n, 2) and len(cached) == n
    # 2-layer teacher, 1-layer student: map [2]; the states 0, 1 (entering layer 2) and 2 on real tokens only
    assert cached.layers == stored_layers(cfg.layer_map) == [0, 1, 2]
    assert cached.meta["tokens"] == int(rows.lengths.sum())
    assert (tmp_path / "t" / "hidden.npy").stat().st_size < 2 * cached.meta["tokens"] * 3 * 384 + 200
    # lambda is per instance, in (1 + t) * [1/(1+e), 1/2]
    lam, t = soft["lambda"], soft["t"]
    assert torch.all(lam <= (1 + t) * 0.5 + 1e-6) and torch.all(lam >= (1 + t) / (1 + torch.e) - 1e-6)
    assert lam.std() > 0 and torch.allclose(t, torch.from_numpy(dd.t))

    teacher.eval()
    index = np.array([5, 0, 3, 7, 1, 2, 4, 6])  # any order: rows are read where they lie
    b = batch_at(rows, index)
    with torch.no_grad():
        live = teacher(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["domain_ids"], internals=True)
    width = b["input_ids"].shape[1]
    hidden = cached.hidden(index, width)
    mask = b["attention_mask"].bool()
    assert torch.allclose(hidden[2].float()[mask], live.hidden_states[2][mask], atol=2e-2)
    assert not hidden[2].float()[~mask].any()  # nothing stored past a row's tokens
    # the attention scores of layer 2, recomputed from the state that enters it
    recomputed = attention_scores(teacher.self_attention()[1], hidden[1].float())
    pairs = (mask[:, None, :, None] & mask[:, None, None, :]).expand_as(recomputed)
    assert torch.allclose(recomputed[pairs], live.attention_scores[1][pairs], atol=5e-2)
    assert torch.allclose(cached.soft(index)["logits"], live.logits, atol=1e-4)
    assert torch.allclose(cached.soft(index)["domain_vector"], live.domain_vector, atol=1e-4)
    cached.close()


def test_student_is_the_teachers_first_layers_and_round_trips(prepared, tmp_path):
    cfg, data, scores, teacher = prepared
    student = build_student(cfg.model.teacher, "", 1, 384, data.labels, data.domains)
    assert student.num_layers == 1
    assert torch.equal(student.encoder.encoder.layer[0].attention.self.query.weight,
                       teacher.encoder.encoder.layer[0].attention.self.query.weight)
    assert torch.equal(student.projection.weight, torch.eye(384))
    save_model(student, tmp_path / "s", {"kind": "student"})
    loaded, info = load_model(tmp_path / "s")
    assert loaded.config.projection_dim == 384 and info["kind"] == "student"
    assert loaded.config.id2label == dict(enumerate(data.labels))
    b = batch_at(data.splits["dev"], [0, 1, 2])
    student.eval(), loaded.eval()
    with torch.no_grad():
        a = student(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["domain_ids"])
        c = loaded(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["domain_ids"])
    assert torch.allclose(a.logits, c.logits, atol=1e-5)


def test_mtl_teacher_reads_each_examples_domain_head_and_mean_pooling_round_trips(prepared, tmp_path):
    cfg, data, scores, _ = prepared
    teacher = build_teacher(cfg.model.teacher, data.labels, data.domains, pooling="mean", domain_heads=True).eval()
    assert teacher.classifier.out_features == len(data.labels) * len(data.domains)
    b = batch_at(data.splits["dev"], [0, 1, 2, 3])
    b["domain_ids"] = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        out = teacher(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["domain_ids"])
        content = teacher.encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                  token_type_ids=b["token_type_ids"]).last_hidden_state
        heads = teacher.classifier(mean_pool(content, b["attention_mask"])).view(4, len(data.domains), -1)
    assert torch.allclose(out.logits, heads[torch.arange(4), b["domain_ids"]], atol=1e-5)
    with pytest.raises(ValueError, match="one classifier head per domain"):
        teacher(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    save_model(teacher, tmp_path / "t", {"kind": "mtl"})
    loaded, _ = load_model(tmp_path / "t")
    assert loaded.config.pooling == "mean" and loaded.config.domain_heads
    with torch.no_grad():
        again = loaded(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["domain_ids"])
    assert torch.allclose(out.logits, again.logits, atol=1e-5)
    # a student cut from it keeps the encoder layers and starts its single head afresh
    student = build_student(cfg.model.teacher, "teacher", 1, 384, data.labels, data.domains,
                            trained_teacher=tmp_path / "t", pooling="mean")
    assert student.classifier.out_features == len(data.labels)
    assert torch.equal(student.encoder.encoder.layer[0].output.dense.weight,
                       loaded.encoder.encoder.layer[0].output.dense.weight)


def test_attention_scores_hook_matches_eager_attention(prepared):
    _, data, _, teacher = prepared
    from transformers import AutoModel

    eager = AutoModel.from_pretrained(str(teacher.encoder.name_or_path), attn_implementation="eager").eval()
    teacher.eval()
    b = batch_at(data.splits["dev"], [0, 1])
    with torch.no_grad():
        ours = teacher(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["domain_ids"], internals=True)
        ref = eager(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    token_type_ids=b["token_type_ids"], output_attentions=True)
    bias = (1 - b["attention_mask"][:, None, None, :].float()) * -1e9
    probs = (ours.attention_scores[0] + bias).softmax(-1)
    assert torch.allclose(probs, ref.attentions[0], atol=1e-4)


@pytest.mark.parametrize("method", ["meta_kd", "no_kd"])
def test_distill_student_without_ray(prepared, tmp_path, method):
    cfg, data, scores, teacher = prepared
    with torch.no_grad():  # an untrained head is near-uniform: give the teacher opinions to learn
        teacher.classifier.weight.mul_(30)
    save_model(teacher, tmp_path / "teacher", {"kind": "meta"})
    dd, signals = domain_data(cfg, data, "kitchen", scores), None
    if method != "no_kd":
        dd, signals = teacher_signals(cfg, data, scores, teacher, "kitchen", True, tmp_path / "t")
    rows = dd.rows(method != "no_kd")

    def fit(model) -> float:
        """What the method trains for, on its training rows: KL to the teacher's soft labels
        (meta_kd) or CE to the gold labels (no_kd)."""
        b = batch_at(rows, np.arange(len(rows)))
        model.eval()
        with torch.no_grad():
            logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["domain_ids"]).logits
        if method == "no_kd":
            return float(torch.nn.functional.cross_entropy(logits, b["labels"]))
        target = signals.soft(np.arange(len(rows)))["logits"]  # KL: soft CE less the teacher's entropy
        return float((losses.soft_cross_entropy(logits, target) - losses.soft_cross_entropy(target, target)).mean())

    cfg.model.pooling = "mean"  # MiniLM's [CLS] pooler was never trained: its token mean learns in a few steps
    cfg.distill.stage2_lr = cfg.distill.stage1_lr = 1e-3
    cfg.distill.no_kd_epochs = 5
    cfg.distill.eval_every = 1000  # the last state is the one kept
    start = fit(build_student(cfg.model.teacher, "", 1, 384, data.labels, data.domains, pooling="mean"))
    out = distill_student(cfg, dd, StudentJob(method, "kitchen"), tmp_path / "teacher", signals)
    r = out["result"]
    assert fit(out["model"]) < 0.9 * start  # it learnt what its method teaches
    assert 0.0 <= r["dev_acc"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0
    assert r["steps"] == (12 if method == "meta_kd" else 30)  # 48 examples / batch 8: 1 epoch per stage, or 5
    assert r["params"] < sum(p.numel() for p in teacher.encoder.parameters())
    assert len(r["history"]) == 1 and r["history"][0]["stage"] in ("stage2", "no_kd")


def test_unlabelled_rows_join_the_distilling_students_only(tiny_config, tmp_path):
    """distill.unlabelled_per_domain: a distilling student also learns the teacher's soft labels on
    its domain's unlabelled training texts (λ from the teacher's own prediction and the domain's
    mean t); no_kd keeps the labelled rows; the teachers' data (its cache key) is unchanged."""
    from metakd_ray.scores import expertise_weight

    plain = prepare(load_config(str(tiny_config())), quiet=True)
    cfg = load_config(str(tiny_config(distill={"unlabelled_per_domain": 8, "hard_label_weight": 1.0})))
    data = prepare(cfg, quiet=True)
    assert data.key == plain.key and not plain.transfer and set(data.transfer) == {"books", "kitchen"}
    labelled = set(np.concatenate([plain.splits[s].uids for s in ("train", "dev", "test")]))
    for domain, extra in data.transfer.items():
        assert (extra.labels == -1).all() and len(extra) == 8 and (extra.domain_ids == data.domain_id(domain)).all()
        assert not set(extra.uids) & labelled

    scores = compute_prototype_scores(cfg, data, quiet=True)
    teacher = build_teacher(cfg.model.teacher, data.labels, data.domains)
    save_model(teacher, tmp_path / "teacher", {"kind": "meta"})
    dd, signals = teacher_signals(cfg, data, scores, teacher, "kitchen", True, tmp_path / "t")
    assert len(signals) == len(dd.rows()) == 48 + 8
    soft = signals.soft(np.arange(56))
    t, lam, logits = soft["t"], soft["lambda"], soft["logits"]
    assert torch.allclose(t[48:], t[:48].mean().expand(8))
    assert torch.allclose(lam[48:], expertise_weight(logits[48:], logits[48:].argmax(-1), t[48:]))

    kd = distill_student(cfg, dd, StudentJob("meta_kd", "kitchen"), tmp_path / "teacher", signals)
    r = kd["result"]
    assert (r["train_examples"], r["unlabelled_examples"], r["steps"]) == (56, 8, 14)  # 56 // 8 per stage
    assert all(torch.isfinite(p).all() for p in kd["model"].parameters())  # hard-label CE skips the -1 rows
    r = distill_student(cfg, dd, StudentJob("no_kd", "kitchen"), None, None)["result"]
    assert (r["train_examples"], r["unlabelled_examples"], r["steps"]) == (48, 0, 6)


def test_cached_and_live_teacher_signals_give_the_same_stage1(prepared, tmp_path):
    """teacher_signals cache (fp16 hidden states of real tokens, attention recomputed from them) and
    live (the teacher in the step) give the same stage-1 loss on the same batch, to fp16 rounding;
    trained a few steps, the two students differ by far less than training moved them."""
    from metakd_ray.distill import stage1_loss

    cfg, data, scores, teacher = prepared
    save_model(teacher, tmp_path / "teacher", {"kind": "meta"})
    dd, cached = teacher_signals(cfg, data, scores, teacher, "books", True, tmp_path / "cache")
    _, soft_only = teacher_signals(cfg, data, scores, teacher, "books", False, tmp_path / "live")
    assert not soft_only.has_internals and not (tmp_path / "live" / "hidden.npy").exists()
    loaded, _ = load_model(tmp_path / "teacher")
    live = LiveTargets(loaded, cfg.layer_map)
    from_cache = CachedTargets(cached, loaded, cfg.layer_map, torch.device("cpu"))
    student = build_student(cfg.model.teacher, "", 1, 384, data.labels, data.domains).eval()
    index = np.array([3, 17, 8, 0, 25, 11, 40, 6])
    b = batch_at(dd.rows(), index)
    with torch.no_grad():
        out = student(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["domain_ids"], internals=True)
    lam = cached.soft(index)["lambda"]
    got = {name: stage1_loss(cfg, student, b, out, targets(b, index, cached.soft(index)), lam, 0.5)
           for name, targets in (("live", live), ("cache", from_cache))}
    assert got["live"][0].item() > 0.1
    assert got["cache"][0].item() == pytest.approx(got["live"][0].item(), rel=2e-3)
    for term in ("hidden", "attention", "domain"):
        assert got["cache"][1][term].item() == pytest.approx(got["live"][1][term].item(), rel=5e-3, abs=1e-6)

    job = StudentJob("meta_kd", "books")
    cfg.distill.stage2_epochs = 0.0001  # stage 1 only matters here
    cfg.distill.stage1_lr = 1e-3
    start = build_student(cfg.model.teacher, "", 1, 384, data.labels, data.domains)
    a = distill_student(cfg, dd, job, tmp_path / "teacher", cached)["model"]
    c = distill_student(cfg, dd, job, tmp_path / "teacher", soft_only)["model"]
    moved = sum((pa - p0).pow(2).sum() for pa, p0 in zip(a.parameters(), start.parameters())).sqrt()
    apart = sum((pa - pc).pow(2).sum() for pa, pc in zip(a.parameters(), c.parameters())).sqrt()
    assert moved > 0.1 and apart < 0.02 * moved, (float(moved), float(apart))


@pytest.mark.ray
def test_run_pipeline_results_agree_with_mlflow(ray_local, tiny_config, capsys):
    from metakd_ray.cli import main

    config = tiny_config()
    assert main(["run", str(config), "--methods", "meta_kd,no_kd,tinybert-mtl"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(str(config))
    results = json.loads((cfg.out / "results.json").read_text())
    assert results["domains"] == ["books", "kitchen"]
    assert set(results["students"]) == {"meta_kd", "no_kd", "tinybert_kd(mtl)"}
    assert set(results["teacher"]["meta"]) == set(results["teacher"]["mtl"]) == {"books", "kitchen"}
    assert "meta_kd" in out and "mean" in out  # the printed table
    # every model timed side by side after training: one figure per teacher kind and method, and
    # each speed-up the ratio of those figures
    timed = results["latency"]["models"]
    assert set(timed) == {"teacher meta", "teacher mtl", "meta_kd", "no_kd", "tinybert_kd(mtl)"}
    assert all(t["latency_b32_ms"] > t["latency_ms"] > 0 for t in timed.values())
    for kind in ("meta", "mtl"):
        assert {c["latency_ms"] for c in results["teacher"][kind].values()} == {timed[f"teacher {kind}"]["latency_ms"]}
    for name, teacher in (("meta_kd", "meta"), ("no_kd", "meta"), ("tinybert_kd(mtl)", "mtl")):
        for cell in results["students"][name].values():
            assert cell["latency_ms"] == timed[name]["latency_ms"]
            assert cell["speedup"] == pytest.approx(timed[f"teacher {teacher}"]["latency_ms"] / cell["latency_ms"])

    client = MlflowClient(results["mlflow"]["tracking_uri"])
    parent = results["mlflow"]["parent_run_id"]
    children = client.search_runs([results["mlflow"]["experiment_id"]],
                                  f"tags.`mlflow.parentRunId` = '{parent}' and tags.`metakd.stage` = 'student'")
    assert len(children) == 6
    for method, per in results["students"].items():
        for domain, r in per.items():
            run = client.get_run(r["run_id"])
            assert run.data.tags["metakd.method"] == method and run.data.tags["metakd.domain"] == domain
            assert run.data.metrics["test_acc"] == pytest.approx(r["test_acc"])
            assert run.data.metrics["dev_acc"] == pytest.approx(r["dev_acc"])
            assert run.data.params["distill.temperature"] == str(cfg.distill.temperature)
            assert run.data.tags["mlflow.source.git.commit"] and run.data.tags["mlflow.source.name"] == "metakd-ray"
            assert {d.dataset.name.rsplit("/", 1)[1] for d in run.inputs.dataset_inputs} == {"train", "dev", "test"}
            model = client.get_logged_model(r["model_id"])
            assert model.source_run_id == r["run_id"] and model.status == "READY"
            files = [a.path for a in client.list_logged_model_artifacts(r["model_id"])]
            assert "MLmodel" in files and "input_example.json" in files
            assert (cfg.out / "students" / method / domain / "model" / "README.md").is_file()
    # one teacher pass per (teacher, domain); the multi-task teacher answers with each domain's own head
    assert len(list((cfg.out / "teacher_outputs" / "meta").glob("*/meta.json"))) == 2
    assert len(list((cfg.out / "teacher_outputs" / "mtl").glob("*/meta.json"))) == 2
    assert load_model(cfg.out / "teachers" / "mtl" / "model")[0].config.domain_heads
    parent_metrics = client.get_run(parent).data.metrics
    assert parent_metrics["test_acc/meta-kd"] == pytest.approx(np.mean([r["test_acc"] for r in
                                                                         results["students"]["meta_kd"].values()]))
    assert parent_metrics["speedup/meta-kd"] == pytest.approx(results["students"]["meta_kd"]["books"]["speedup"])
    # where the time went, stage by stage, in results.json and on the parent run
    assert list(results["stage_seconds"]) == ["prepare", "prototypes", "teachers", "students", "latency"]
    for stage, seconds in results["stage_seconds"].items():
        assert seconds >= 0 and parent_metrics[f"seconds/{stage}"] == pytest.approx(seconds)
    assert results["stage_seconds"]["teachers"] > 1 and results["stage_seconds"]["students"] > 1
    assert all(c["started_at"] < c["finished_at"] for per in results["students"].values() for c in per.values())
    for domain in results["domains"]:  # the dev-best student of each domain, registered
        best = client.get_model_version_by_alias(f"metakd-{cfg.tracking.experiment}-{domain}", "best")
        assert best.run_id == max((per[domain] for per in results["students"].values()),
                                  key=lambda r: r["dev_acc"])["run_id"]

    # The saved student outside the pipeline: `predict`, ONNX fp32 and int8, and a transformers
    # pipeline give the labels the pipeline's own evaluation scored.
    student = cfg.out / "students" / "meta_kd" / "books" / "model"
    test_file = student.parent.parent.parent.parent / "books-test.jsonl"
    rows = [r for r in read_split(next((cfg.out / "cache").glob("data-*/test.arrow"))).table.to_pylist()
            if r["domain"] == "books"]
    test_file.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["predict", str(student), "--file", str(test_file), "--json"]) == 0
    predicted = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
    labels = cfg.label_names
    accuracy = np.mean([labels[r["label"]] == p for r, p in zip(rows, predicted)])
    assert len(predicted) == len(rows) and accuracy == pytest.approx(results["students"]["meta_kd"]["books"]["test_acc"])
    classify = pipeline("text-classification", model=str(student))
    assert [o["label"] for o in classify([r["text"] for r in rows], truncation=True)] == predicted
    assert main(["export", str(student), "--onnx", "--int8"]) == 0
    exported = json.loads((student / "onnx" / "export.json").read_text())
    assert exported["checks"]["onnx fp32"]["label_agreement"] == 1.0
    assert exported["checks"]["onnx int8"]["label_agreement"] >= 0.97
    assert [r["model"] for r in exported["speed"]][:2] == ["teacher pytorch fp32", "student pytorch fp32"]

    # A damaged result.json and a truncated student model (a crash, a full disk): the next run says
    # so, trains those two students again and keeps the others.
    students = cfg.out / "students"
    (students / "no_kd" / "kitchen" / "result.json").write_text('{"key": ')
    weights = students / "meta_kd" / "kitchen" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    kept = (students / "no_kd" / "books" / "result.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", str(config), "--methods", "meta_kd,no_kd,tinybert-mtl"]) == 0
    out = capsys.readouterr().out
    assert "no_kd/kitchen/result.json is damaged" in out and "model.safetensors is damaged" in out
    assert "2 student(s) on Ray" in out and "no_kd/books: already done" in out
    assert (students / "no_kd" / "books" / "result.json").stat().st_mtime_ns == kept
    assert json.loads((students / "no_kd" / "kitchen" / "result.json").read_text())["domain"] == "kitchen"


@pytest.mark.slow  # two more teacher fits; the default run covers the averaging in test_math
@pytest.mark.ray
def test_multi_teacher_student_reads_every_single_domain_teacher(ray_local, tiny_config):
    from metakd_ray.cli import main

    config = tiny_config()
    assert main(["run", str(config), "--methods", "mtn-kd"]) == 0
    cfg = load_config(str(config))
    results = json.loads((cfg.out / "results.json").read_text())
    assert set(results["students"]["mtn_kd"]) == {"books", "kitchen"}
    assert set(results["teacher"]) == {"single"}
    # each domain's teacher answered on both domains' training data: 2 teachers x 2 domains
    for name in ("single-books", "single-kitchen"):
        assert sorted(p.name.split("-")[0] for p in (cfg.out / "teacher_outputs" / name).iterdir()) == [
            "books", "kitchen"]


def test_killed_driver_reruns_only_missing_students(tiny_config, tmp_path):
    config = tiny_config(distill={"cpus_per_task": 2})  # one student at a time
    cfg = load_config(str(config))
    cmd = [sys.executable, "-m", "metakd_ray.cli", "run", str(config), "--methods", "no_kd"]
    env = dict(os.environ, RAY_ADDRESS="")
    log = tmp_path / "first.log"
    kill_when(cmd, log, lambda: list((cfg.out / "students").glob("*/*/result.json")), timeout=400, poll=0.2)
    finished = list((cfg.out / "students").glob("*/*/result.json"))
    assert len(finished) == 1, log.read_text()[-3000:]
    first_mtime = finished[0].stat().st_mtime_ns
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    done_domain = finished[0].parent.name
    assert f"no_kd/{done_domain}: already done" in second.stdout
    assert "1 student(s) on Ray" in second.stdout
    # a quiet terminal: no progress bars or Ray/MLflow bookkeeping, and the students' progress
    assert noise_lines(second.stdout + second.stderr) == [], second.stdout + second.stderr
    assert "[distill] 1/1 done" in second.stdout, second.stdout
    assert finished[0].stat().st_mtime_ns == first_mtime
    results = json.loads((cfg.out / "results.json").read_text())
    assert set(results["students"]["no_kd"]) == {"books", "kitchen"}


def test_progress_board_prints_changes_only_with_steps_and_time_left():
    from metakd_ray.distill import ProgressBoard

    jobs = [StudentJob(m, d) for m in ("meta_kd", "no_kd") for d in ("books", "kitchen")]
    board = ProgressBoard(jobs, every=20)
    t0 = board.started
    # the first steps are seen at 10 s (after start-up): no rate yet
    assert board.line({"meta_kd/books": (5, 100)}, now=t0 + 10) == ("[distill] 0/4 done · running meta_kd/books 5/100"
                                                                    " · 3 waiting to start · 10s elapsed")
    running = {"meta_kd/books": (50, 100), "meta_kd/kitchen": (25, 100)}
    line = board.line(running, now=t0 + 40)
    # 70 steps in the 30 s since then: 325 of the 400 planned steps left at 7/3 steps/s = 139 s
    assert line == ("[distill] 0/4 done · running meta_kd/books 50/100, meta_kd/kitchen 25/100 · "
                    "2 waiting to start · 40s elapsed, about 2m19s left")
    assert board.line(running, now=t0 + 70) is None  # nothing changed: no heartbeat line
    assert board.line({"meta_kd/books": (60, 100)}, now=t0 + 45) is None  # changed, but within 20 s
    board.finish("meta_kd/books", 100)
    assert board.line({"meta_kd/kitchen": (30, 100)}, force=True, now=t0 + 46).startswith("[distill] 1/4 done")


def test_a_narrow_student_starts_closer_to_its_teacher_as_its_compressed_layers(tiny_config):
    """general.narrow_init: a student 128 wide (the teacher's head size, 4 of its 12 heads) that starts
    as the teacher's layers compressed imitates the pretrained teacher better on held-out text, before
    any step, than one whose layers start random; and it is still trained from there."""
    from metakd_ray.general import general_distill

    losses = {}
    for start in ("embeddings", "teacher_layers"):
        cfg = load_config(str(tiny_config(model={"student_init": "general", "student_hidden": 128, "student_heads": 4},
                                          general={"epochs": 0.01, "batch_size": 16, "narrow_init": start})))
        data = prepare(cfg, quiet=True)
        lines = []
        losses[start] = general_distill(cfg, data, say=lines.append)["result"]["dev_loss"]
        assert any("compressed to 128 dimensions" in line for line in lines) == (start == "teacher_layers")
    assert losses["teacher_layers"] < 0.7 * losses["embeddings"]
    cfg.general.epochs = 2
    assert general_distill(cfg, data, say=lambda line: None)["result"]["dev_loss"] < losses["teacher_layers"]


def test_general_distillation_learns_and_students_start_from_it(tiny_config, tmp_path):
    """The general student imitates the pretrained teacher better after training than at its
    (PCA-embedding) start, on held-out text; a student built from the saved files is that model."""
    from metakd_ray.general import general_distill, save_general

    config = tiny_config(model={"student_init": "general", "student_hidden": 96, "student_heads": 4},
                         general={"epochs": 0.01, "batch_size": 16, "lr": 1e-3})
    cfg = load_config(str(config))
    data = prepare(cfg, quiet=True)
    lines = []
    start = general_distill(cfg, data, say=lines.append)["result"]
    assert start["steps"] == 0 and any("layers start random" in line for line in lines)  # head size 24, not 32
    cfg.general.epochs = 4
    out = general_distill(cfg, data, say=lambda line: None)
    assert out["result"]["steps"] == 24 and out["result"]["dev_loss"] < 0.8 * start["dev_loss"]
    assert out["result"]["teacher_params"] > 4 * out["result"]["params"]
    save_general(out["model"], tmp_path / "general")
    student = build_student(cfg.model.teacher, "general", 1, 384, data.labels, data.domains,
                            general=tmp_path / "general").eval()
    trained = out["model"].eval()
    b = batch_at(data.splits["dev"], [0, 1, 2])
    with torch.no_grad():
        a = student(b["input_ids"], b["attention_mask"], b["token_type_ids"], internals=True)
        c = trained(b["input_ids"], b["attention_mask"], b["token_type_ids"], internals=True)
    assert torch.allclose(student.projection(a.hidden_states[-1]), trained.projection(c.hidden_states[-1]), atol=1e-5)
