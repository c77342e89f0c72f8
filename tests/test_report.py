"""The comparison report (pure aggregation and the real thing over two real pipeline runs), and the
MLflow UI showing a pipeline parent with its child runs in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write_config

from metakd_ray.config import load_config
from metakd_ray.pipeline import LATENCY_KEYS
from metakd_ray.report import Setting, margins, mean_std, summarize

sys.path.insert(0, str(REPO / "bench"))


def fake_results(name: str, seed: int, accs: dict[str, list[float]], domains=("books", "kitchen")) -> dict:
    return {"name": name, "seed": 42, "student_seed": seed, "domains": list(domains),
            "teacher": {"meta": {d: {"dev_acc": 0.9, "test_acc": 0.9, "params": 7.5e6, "latency_ms": 9.0}
                                 for d in domains}},
            "students": {m: {d: {"test_acc": a, "dev_acc": a, "params": 1e6, "latency_ms": 2.0}
                             for d, a in zip(domains, values)} for m, values in accs.items()},
            "config": {"data": {"target_fraction": 1.0}}, "source": f"seed{seed}"}


def test_mean_std_and_meta_kd_margins_are_hand_computable():
    mean, std, n = mean_std(np.array([0.8, 0.9, np.nan]))
    assert (round(mean, 6), round(std, 6), n) == (0.85, round(np.sqrt(0.005), 6), 2)
    runs = [fake_results("s", 0, {"meta_kd": [0.80, 0.90], "no_kd": [0.70, 0.80]}),
            fake_results("s", 1, {"meta_kd": [0.70, 0.80], "no_kd": [0.80, 0.80]})]
    setting = Setting("s", ["books", "kitchen"], runs)
    m = margins(setting)["no_kd"]
    # per-seed averages: meta_kd 0.85, 0.75; no_kd 0.75, 0.80 -> paired differences +0.10, -0.05
    assert m["diff"] == pytest.approx(0.025)
    assert m["paired_std"] == pytest.approx(np.std([0.10, -0.05], ddof=1))
    assert (m["seeds_ahead"], m["seeds"]) == (1, 2)
    rows = summarize([setting])["s"]["rows"]
    assert rows["meta_kd"]["per_domain"]["books"]["mean"] == pytest.approx(0.75)
    assert rows["meta_kd"]["avg"]["std"] == pytest.approx(np.std([0.85, 0.75], ddof=1))
    assert rows["teacher meta"]["avg"]["mean"] == pytest.approx(0.9)
    sizes = summarize([setting])["s"]["size_and_speed"]  # 7.5 M / 1 M parameters, 9 ms / 2 ms
    assert sizes["meta_kd"]["compression"] == pytest.approx(7.5) and sizes["no_kd"]["speedup"] == pytest.approx(4.5)


def test_one_report_holds_settings_over_different_domains(tmp_path):
    from metakd_ray.report import build_report

    amazon = fake_results("amazon", 0, {"meta_kd": [0.80, 0.90], "no_kd": [0.70, 0.80]})
    mnli = fake_results("mnli", 0, {"meta_kd": [0.40, 0.50, 0.45], "no_kd": [0.35, 0.40, 0.38]},
                        domains=("fiction", "government", "slate"))
    summary = build_report([amazon, mnli], tmp_path / "report", log_to_mlflow=False)
    assert summary["mnli"]["rows"]["meta_kd"]["avg"]["mean"] == pytest.approx(0.45)
    assert summary["amazon"]["rows"]["no_kd"]["avg"]["mean"] == pytest.approx(0.75)
    for name in ("report.md", "heatmap.png", "size_latency.png", "gap.png"):
        assert (tmp_path / "report" / name).is_file(), name
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Setting `amazon`" in md and "## Setting `mnli`" in md
    assert "timed when it finished training" in md  # results without the side-by-side timing say so


def test_reductions_name_each_departure_from_the_paper_protocol():
    from metakd_ray.report import reductions_vs_paper

    run = fake_results("cpu", 0, {"meta_kd": [0.8, 0.9]})
    run["config"] = {"data": {"target_fraction": 1.0, "max_length": 64, "max_train_per_domain": 200},
                     "distill": {"attention_target": "probs", "temperature": 1.0}}
    line, model_note = reductions_vs_paper([Setting("cpu", ["books", "kitchen"], [run])])
    assert line == ("`cpu`: data.max_length = 64 (paper protocol: 128); data.max_train_per_domain = 200 "
                    "(paper protocol: all); distill.attention_target = probs (paper protocol: scores)")
    assert model_note.startswith("Model: the paper distils BERT-base")
    assert reductions_vs_paper([Setting("paper", ["books"], [fake_results("paper", 0, {"meta_kd": [0.8]},
                                                                           domains=("books",))])]) == []


# --------------------------------------------------------------------------- real pipeline runs


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory, tiny_amazon, tiny_teacher):
    """Two real tiny pipeline runs (student seeds 0 and 1, one shared teacher and general-distilled
    student) in one MLflow store; the students are 1 layer x 96 wide, general-distilled."""
    import ray

    from metakd_ray.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("report")
    store = f"sqlite:///{root / 'mlflow.db'}"
    outs = []
    try:
        for seed in (0, 1):
            out = root / f"seed{seed}"
            config = write_config(root / f"seed{seed}.yaml", tiny_amazon, tiny_teacher, out,
                                  name="tiny", tracking={"tracking_uri": store, "experiment": "report-test"},
                                  distill={"seed": seed},
                                  model={"student_init": "general", "student_hidden": 96, "student_heads": 4},
                                  general={"epochs": 2, "batch_size": 16, "num_cpus": 1})
            if seed:  # the same teacher and general student for every student seed, as bench/fidelity.py does
                out.mkdir()
                for shared in ("teachers", "general"):
                    (out / shared).symlink_to(outs[0] / shared, target_is_directory=True)
            run_pipeline(load_config(str(config)), ["meta_kd", "no_kd"])
            outs.append(out)
    finally:
        ray.shutdown()
    return root, store, outs


@pytest.mark.ray
def test_report_over_seeds_from_directories_and_from_mlflow(two_seeds, tmp_path, capsys):
    from mlflow import MlflowClient

    from metakd_ray.cli import main

    root, store, outs = two_seeds
    first, second = (json.loads((o / "results.json").read_text()) for o in outs)
    # the teacher's cells agree but for its latency, which every run times again
    untimed = [{kind: {d: {k: v for k, v in c.items() if k not in LATENCY_KEYS} for d, c in per.items()}
                for kind, per in r["teacher"].items()} for r in (first, second)]
    assert untimed[0] == untimed[1], "the second seed retrained the shared teacher"
    assert main(["report", str(outs[0]), str(outs[1]), "--out", str(tmp_path / "report")]) == 0
    report = tmp_path / "report"
    for name in ("report.md", "report.json", "heatmap.png", "size_latency.png", "gap.png", "curves.png"):
        assert (report / name).is_file(), name
    summary = json.loads((report / "report.json").read_text())["settings"]["tiny"]
    assert summary["seeds"] == [0, 1]
    for d in ("books", "kitchen"):
        want = np.mean([first["students"]["meta_kd"][d]["test_acc"], second["students"]["meta_kd"][d]["test_acc"]])
        assert summary["rows"]["meta_kd"]["per_domain"][d]["mean"] == pytest.approx(want)
    assert summary["rows"]["teacher meta"]["latency_ms"] > summary["rows"]["meta_kd"]["latency_ms"] > 0
    assert summary["latency_side_by_side"] and "timed side by side after training" in (report / "report.md").read_text()
    assert set(summary["meta_kd_margins"]) == {"no_kd"}
    margin = summary["meta_kd_margins"]["no_kd"]
    lo, hi = margin["ci"]  # per-example results give a paired bootstrap interval and a verdict
    assert lo <= margin["diff"] <= hi and margin["verdict"] in ("ahead", "behind", "tie")
    cell = first["students"]["meta_kd"]["books"]  # one 0/1 per test example
    assert set(cell["test_correct"]) <= {"0", "1"} and cell["test_correct"].count("1") / len(cell["test_correct"]) \
        == pytest.approx(cell["test_acc"])
    md = (report / "report.md").read_text()
    assert "| meta_kd |" in md and "±" in md and "vs `no_kd`" in md and "max_length = 32" in md
    assert f"**{margin['verdict']}**" in md
    assert "meta_kd" in capsys.readouterr().out

    # one general-distilled student (one MLflow run) shared by both seeds and both methods: a
    # 96-wide student of the 384-wide teacher, about 4x fewer encoder parameters
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("report-test").experiment_id
    general = client.search_runs([exp], "tags.`metakd.stage` = 'general'")
    assert len(general) == 1 and general[0].data.metrics["compression"] > 3
    assert "general/hidden" in general[0].data.metrics and "general/attention" in general[0].data.metrics
    assert first["students"]["meta_kd"]["books"]["params"] == second["students"]["no_kd"]["kitchen"]["params"]
    assert first["students"]["meta_kd"]["books"]["params"] * 3 < first["teacher"]["meta"]["books"]["params"]
    student = client.search_runs([exp], "tags.`metakd.method` = 'meta_kd'")[0].data.metrics
    assert {"stage1/hidden", "stage1/attention", "stage1/domain"} <= student.keys()  # per-term magnitudes

    # logged to each pipeline parent run
    for r in (first, second):
        names = {a.path for a in client.list_artifacts(r["mlflow"]["parent_run_id"], "report")}
        assert "report/report.md" in names and "report/heatmap.png" in names

    # the same report from the MLflow experiment alone
    assert main(["report", "--experiment", "report-test", "--tracking-uri", store, "--out", str(tmp_path / "r2")]) == 0
    from_mlflow = json.loads((tmp_path / "r2" / "report.json").read_text())["settings"]["tiny"]
    assert from_mlflow["rows"]["meta_kd"]["avg"] == pytest.approx(summary["rows"]["meta_kd"]["avg"])


def test_bad_report_sources_fail_cleanly_and_keep_the_old_report(tmp_path, capsys):
    from mlflow import MlflowClient

    from metakd_ray.cli import main

    old = tmp_path / "report"
    old.mkdir()
    (old / "report.md").write_text("earlier report")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text('{"domains": ["books"]}')
    store = tmp_path / "empty.db"
    MlflowClient(f"sqlite:///{store}").search_experiments()  # an existing store without the experiment
    capsys.readouterr()
    for argv in (["report", str(tmp_path / "missing")], ["report", str(bad), "--out", str(old)], ["report"],
                 ["report", "--experiment", "nope", "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}"],
                 ["report", "--experiment", "nope", "--tracking-uri", f"sqlite:///{store}"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert (old / "report.md").read_text() == "earlier report"


# --------------------------------------------------------------------------- the MLflow UI in a browser


def chromium_or_skip() -> None:
    from mlflow_ui import CHROMIUM

    missing = [what for what, ok in (("Debian chromium", Path(CHROMIUM).is_file()),
                                     ("playwright", _importable("playwright"))) if not ok]
    if missing:
        message = f"browser test needs {' and '.join(missing)} (.ci/run installs them: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.browser
@pytest.mark.ray
def test_mlflow_ui_lists_the_pipeline_parent_and_its_child_runs(two_seeds, tmp_path):
    chromium_or_skip()
    from mlflow import MlflowClient
    from mlflow_ui import capture, mlflow_server, page_text

    root, store, outs = two_seeds
    results = json.loads((outs[0] / "results.json").read_text())
    client = MlflowClient(store)
    parent = client.get_run(results["mlflow"]["parent_run_id"])
    children = client.search_runs([results["mlflow"]["experiment_id"]],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    child_names = sorted({c.info.run_name for c in children})
    assert {"student-meta_kd-books", "student-no_kd-kitchen", "teacher-meta"} <= set(child_names)

    png = tmp_path / "mlflow-ui.png"
    student = results["students"]["meta_kd"]["books"]
    registered = sorted(f"metakd-report-test-{d}" for d in results["domains"])
    with mlflow_server(store, tmp_path / "server.log") as url:
        text = capture(url, results["mlflow"]["experiment_id"], [parent.info.run_name], png, child_names)
        # the student's run page shows its logged model; the registry lists each domain's best student
        run_page = page_text(url, f"experiments/{results['mlflow']['experiment_id']}/runs/{student['run_id']}",
                             ["student-meta_kd-books", "Logged models"], tmp_path / "run.png")
        registry = page_text(url, "models", registered, tmp_path / "models.png")
    assert parent.info.run_name in text
    for name in child_names:
        assert name in text, f"{name} not listed under its parent:\n{text}"
    assert png.stat().st_size > 20_000
    assert "student-meta_kd-books" in run_page
    assert all(name in registry for name in registered), registry
    for name in ("mlflow-ui.png", "run.png", "models.png"):  # kept beside the store for a look after a failure
        shutil.copy(tmp_path / name, root / name)


def test_paired_bootstrap_interval_and_verdicts():
    from metakd_ray.report import paired_bootstrap, verdict

    rng = np.random.default_rng(0)
    # two domains, three seeds, 200 examples: ours right on 10 % more examples than theirs
    better = [np.where(rng.random((3, 200)) < 0.1, 1, 0) for _ in range(2)]
    delta, lo, hi = paired_bootstrap(better)
    assert delta == pytest.approx(np.mean([d.mean() for d in better])) and 0 < lo < delta < hi
    assert verdict(lo, hi) == "ahead" and verdict(-hi, -lo) == "behind"
    same = [np.zeros((3, 200), dtype=int)] * 2  # identical predictions: no difference, no spread
    assert paired_bootstrap(same) == (0.0, 0.0, 0.0) and verdict(0.0, 0.0) == "tie"
    # one example in 200 of one seed: a difference the interval cannot tell from 0
    tiny = np.zeros((3, 200), dtype=int)
    tiny[0, 0] = 1
    delta, lo, hi = paired_bootstrap([tiny])
    assert lo <= 0 <= hi and verdict(lo, hi) == "tie"
