"""The comparison report: domain x method test accuracy over seeds, beside the paper, with plots.

    metakd-ray report outputs/amazon                      # one run's results.json
    metakd-ray report bench/out/fidelity                  # every */results.json below (seeds, settings)
    metakd-ray report --experiment metakd-amazon          # every pipeline run in an MLflow experiment

Runs are grouped by setting (the config's ``name``); each setting's seeds give mean ± std. The
report is ``report.md`` plus PNGs (heatmap, accuracy vs size and latency, teacher/student gap,
training curves) and ``report.json``, written atomically and logged to every source pipeline's
MLflow parent run under ``report/``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metakd_ray import plots
from metakd_ray.errors import MetaKDError
from metakd_ray.methods import METHODS
from metakd_ray.io import atomic_dir, read_json, text_table

# The paper's stated Avg test accuracy in % (Pan et al. 2021, Tables 2 and 3): recalled, not checked
# against the PDF.
PAPER_DOMAINS = {
    "amazon": ["books", "dvd", "electronics", "kitchen"],
    "mnli": ["fiction", "government", "slate", "telephone", "travel"],
}
PAPER_AVG = {
    "amazon": {"teacher single": 87.9, "teacher mix": 89.5, "teacher mtl": 89.8, "teacher meta": 89.9,
               "tinybert_kd(single)": 86.7, "tinybert_kd(mix)": 87.3, "tinybert_kd(mtl)": 87.7, "mtn_kd": 84.8,
               "tinybert_kd(meta)": 88.3, "meta_kd": 89.4},
    "mnli": {"teacher single": 81.9, "teacher mix": 84.4, "teacher mtl": 84.2, "teacher meta": 84.4,
             "tinybert_kd(single)": 79.3, "tinybert_kd(mix)": 79.6, "tinybert_kd(mtl)": 79.7, "mtn_kd": 77.2,
             "tinybert_kd(meta)": 80.0, "meta_kd": 80.4},
}
TEACHER_OF = {m.name: m.teacher_row for m in METHODS.values() if m.distils}


@dataclass
class Setting:
    """All seeds of one configuration (one ``name``)."""

    name: str
    domains: list[str]
    runs: list[dict] = field(default_factory=list)

    @property
    def config(self) -> dict:
        return self.runs[0].get("config", {})

    def rows(self) -> list[str]:
        names: list[str] = []
        for r in self.runs:
            for row in [f"teacher {k}" for k in r["teacher"]] + list(r["students"]):
                if row not in names:
                    names.append(row)
        return names

    def cells(self, row: str, key: str = "test_acc") -> np.ndarray:
        """[seeds, domains] of ``key`` (NaN where a seed lacks the cell)."""
        out = np.full((len(self.runs), len(self.domains)), np.nan)
        for i, r in enumerate(self.runs):
            table = _row_of(r, row)
            for j, d in enumerate(self.domains):
                if d in table and table[d].get(key) is not None:
                    out[i, j] = table[d][key]
        return out


def _row_of(results: dict, row: str) -> dict:
    """{domain: cell} of one row ("teacher <kind>" or a student method) of one results.json."""
    if row.startswith("teacher "):
        return results["teacher"].get(row[len("teacher "):], {})
    return results["students"].get(row, {})


# --------------------------------------------------------------------------- pure aggregation


def mean_std(values: np.ndarray) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof = 1; 0 for one value) and count of the finite values."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def seed_means(cells: np.ndarray) -> np.ndarray:
    """Per-seed average over domains (seeds missing a domain are dropped)."""
    return np.array([row.mean() for row in cells if np.isfinite(row).all()])


def paired_bootstrap(diffs: list[np.ndarray], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Paired difference of two students with a 95 % bootstrap interval over seeds and test examples.

    ``diffs[d]`` is [S, n_d]: correct(ours) - correct(theirs) in {-1, 0, 1} for seed s and test
    example i of domain d. The statistic is the seed-mean of the domain-averaged accuracy difference,

        Δ = mean_s mean_d mean_i diffs[d][s, i].

    Each resample draws S seeds with replacement and, per domain, n_d test examples with
    replacement, the same examples for every seed and for both students (the pairing). Returns
    (Δ, 2.5th percentile, 97.5th percentile).
    """
    rng = np.random.default_rng(seed)
    n_seeds = diffs[0].shape[0]
    seed_draw = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    per_domain = []
    for d in diffs:
        n = d.shape[1]
        counts = np.zeros((resamples, n))
        np.add.at(counts, (np.repeat(np.arange(resamples), n), rng.integers(0, n, size=resamples * n)), 1)
        by_seed = counts @ d.T.astype(float) / n  # [resamples, S]: each seed's mean under the example draw
        per_domain.append(np.take_along_axis(by_seed, seed_draw, 1).mean(1))
    stats = np.mean(per_domain, axis=0)
    delta = float(np.mean([d.mean() for d in diffs]))
    return delta, float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def verdict(lo: float, hi: float) -> str:
    """"ahead" / "behind" only when the 95 % interval excludes 0."""
    return "ahead" if lo > 0 else "behind" if hi < 0 else "tie"


def correctness_diffs(setting: Setting, ours: str, theirs: str) -> list[np.ndarray] | None:
    """Per domain, [seeds, examples] of correct(ours) - correct(theirs) over the seeds that have
    both rows' per-example test results (``test_correct``); None when there are none."""
    out = []
    for d in setting.domains:
        rows = []
        for r in setting.runs:
            a, b = (_row_of(r, row).get(d, {}).get("test_correct") for row in (ours, theirs))
            if a and b and len(a) == len(b):
                rows.append(np.frombuffer(a.encode(), np.uint8).astype(int) - np.frombuffer(b.encode(), np.uint8))
        if not rows or len(rows) != len(setting.runs):
            return None
        out.append(np.stack(rows))
    return out


def margins(setting: Setting, method: str = "meta_kd") -> dict[str, dict]:
    """``method`` minus each other student row, on the domain average.

    diff = mean_s(avg_d acc[method]) - mean_s(avg_d acc[other]); ``paired_std`` is the std over
    seeds of the per-seed difference (seeds share data splits and teachers, so pairing is fair);
    ``ci`` the 95 % paired bootstrap interval (``paired_bootstrap``) and ``verdict`` ahead / behind /
    tie, when the runs have per-example test results.
    """
    if method not in setting.rows():
        return {}
    ours = seed_means(setting.cells(method))
    out = {}
    for other in setting.rows():
        if other == method or other.startswith("teacher "):
            continue
        theirs = seed_means(setting.cells(other))
        n = min(len(ours), len(theirs))
        if n == 0:
            continue
        paired = ours[:n] - theirs[:n]
        out[other] = {"diff": float(ours.mean() - theirs.mean()), "paired_std": mean_std(paired)[1],
                      "seeds_ahead": int((paired > 0).sum()), "seeds": n}
        diffs = correctness_diffs(setting, method, other)
        if diffs:
            _, lo, hi = paired_bootstrap(diffs)
            out[other].update(ci=[lo, hi], verdict=verdict(lo, hi))
    return out


def summarize(settings: list[Setting]) -> dict:
    """Everything the Markdown and the plots show, as plain numbers (report.json)."""
    out = {}
    for s in settings:
        rows = {}
        for row in s.rows():
            acc = s.cells(row)
            per_domain = {d: dict(zip(("mean", "std", "n"), mean_std(acc[:, j]))) for j, d in enumerate(s.domains)}
            avg = mean_std(seed_means(acc))
            run_ids = {c.get("run_id") for r in s.runs for c in _row_of(r, row).values()}
            first_ids = {c.get("run_id") for c in _row_of(s.runs[0], row).values()}
            rows[row] = {"per_domain": per_domain, "avg": dict(zip(("mean", "std", "n"), avg)),
                         "shared": len(s.runs) > 1 and None not in run_ids and run_ids == first_ids,
                         "params": _finite_mean(s.cells(row, "params")),
                         "latency_ms": _finite_mean(s.cells(row, "latency_ms"))}
        out[s.name] = {"domains": s.domains, "seeds": [r.get("student_seed", r.get("seed")) for r in s.runs],
                       "target_fraction": s.config.get("data", {}).get("target_fraction", 1.0),
                       "rows": rows, "meta_kd_margins": margins(s),
                       # results.json files older than pipeline.time_side_by_side hold each model's latency
                       # as timed when it finished training, under whatever load there was then
                       "latency_side_by_side": all(r.get("latency") for r in s.runs)}
        out[s.name]["size_and_speed"] = size_and_speed(out[s.name])
    return out


def _finite_mean(values: np.ndarray) -> float | None:
    v = values[np.isfinite(values)]
    return float(v.mean()) if v.size else None


def paper_table(domains: list[str]) -> tuple[str, dict] | None:
    """(dataset, {row: stated Avg}) of the paper's table when ``domains`` are exactly its domains."""
    for dataset, names in PAPER_DOMAINS.items():
        if list(domains) == names:
            return dataset, PAPER_AVG[dataset]
    return None


# --------------------------------------------------------------------------- loading


def load_results(sources: list[str]) -> list[dict]:
    """results.json contents from files, run directories, or directories of run directories."""
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_file():
            found.append(path)
        elif (path / "results.json").is_file():
            found.append(path / "results.json")
        elif path.is_dir() and sorted(path.glob("*/results.json")):
            found.extend(sorted(path.glob("*/results.json")))
        else:
            raise MetaKDError(f"{path}: no results.json there (expected a run's output directory, a results.json "
                              f"file, or a directory of run directories; run `metakd-ray run` first)")
    out = []
    for path in found:
        data = read_json(path)
        if not isinstance(data, dict) or not {"domains", "teacher", "students"} <= data.keys():
            raise MetaKDError(f"{path}: not a metakd-ray results.json (expected keys domains, teacher, students)")
        out.append(dict(data, source=str(path)))
    return out


def load_results_from_mlflow(experiment: str, tracking_uri: str) -> list[dict]:
    """The results.json artifact of every pipeline parent run in ``experiment``."""
    from mlflow import MlflowClient

    from metakd_ray.tracking import STAGE

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        raise MetaKDError(f"--tracking-uri: no MLflow store at {tracking_uri} (the file does not exist)")
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise MetaKDError(f"--experiment: no MLflow experiment {experiment!r} at {tracking_uri} "
                          f"(set --tracking-uri or MLFLOW_TRACKING_URI to the store that has it)")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in client.search_runs([exp.experiment_id], filter_string=f"tags.`{STAGE}` = 'pipeline'",
                                      max_results=1000):
            try:
                local = client.download_artifacts(run.info.run_id, "results.json", tmp)
            except Exception:  # a pipeline that has not finished has no results.json yet
                continue
            out.append(dict(json.loads(Path(local).read_text()), source=f"mlflow run {run.info.run_id}"))
    if not out:
        raise MetaKDError(f"--experiment: no finished pipeline run (with a results.json artifact) in {experiment!r}")
    return out


def group(results: list[dict]) -> list[Setting]:
    settings: dict[str, Setting] = {}
    for r in sorted(results, key=lambda r: (r.get("name", ""), r.get("student_seed", r.get("seed", 0)))):
        name = r.get("name") or "run"
        s = settings.setdefault(name, Setting(name, list(r["domains"])))
        if list(r["domains"]) != s.domains:
            raise MetaKDError(f"{r['source']}: domains {r['domains']} differ from {s.domains} of another "
                              f"run named {name!r} (give different settings different config names)")
        s.runs.append(r)
    return list(settings.values())


# --------------------------------------------------------------------------- Markdown


def _pm(mean: float, std: float, n: int, scale: float = 100.0, shared: bool = False) -> str:
    if n == 0:
        return "–"
    if shared:
        return f"{mean * scale:.1f} (shared)"
    return f"{mean * scale:.1f} ± {std * scale:.1f}" if n > 1 else f"{mean * scale:.1f}"


def _row_cells(cell: dict, domains: list[str]) -> list[str]:
    """One row's per-domain cells then its Avg, formatted."""
    return [_pm(**stats, shared=cell["shared"]) for stats in [cell["per_domain"][d] for d in domains] + [cell["avg"]]]


def markdown(settings: list[Setting], summary: dict, reductions: list[str], figures: list[str]) -> str:
    lines = ["# metakd-ray comparison report", "",
             "Test accuracy in %, mean ± std over seeds (sample std), averaged per seed over domains for "
             "the Avg column.", ""]
    for s in settings:
        info = summary[s.name]
        lines += [f"## Setting `{s.name}`", "",
                  f"{len(s.runs)} run(s), seeds {info['seeds']}, target_fraction {info['target_fraction']}.", "",
                  "| row | " + " | ".join(s.domains) + " | Avg |", "|---" * (len(s.domains) + 2) + "|"]
        for row, cell in info["rows"].items():
            *per, avg = _row_cells(cell, s.domains)
            lines.append(f"| {row} | " + " | ".join(per) + f" | **{avg}** |")
        lines.append("")
        if any(cell["shared"] for cell in info["rows"].values()):
            lines += ["(shared) = one trained model that every seed of this setting reused, so it has no spread.", ""]
        if info["meta_kd_margins"]:
            lines += _margin_lines(info["meta_kd_margins"])
        gaps = teacher_gaps(info)
        if gaps:
            lines += ["Teacher → student gap (teacher Avg minus student Avg, points):", ""]
            lines += [f"- `{row}` from `{teacher}`: {gap:+.1f}" for row, (teacher, gap) in gaps.items()] + [""]
        sizes = size_and_speed(info)
        if sizes:
            timed = ("every model timed side by side after training" if info["latency_side_by_side"] else
                     "each model timed when it finished training, under the load of that moment, so the speed-ups "
                     "drift")
            lines += ["Size and speed against the teacher (encoder parameters; batch-1 latency on one CPU thread, "
                      f"fp32, {timed}; the paper's TinyBERT-4L is 7.5× smaller and 9.4× faster than BERT-base):", ""]
            lines += [f"- `{row}`: {r['params'] / 1e6:.1f} M parameters vs {r['teacher_params'] / 1e6:.1f} M "
                      f"(**{r['compression']:.2f}× smaller**), {r['latency_ms']:.1f} ms vs "
                      f"{r['teacher_latency_ms']:.1f} ms (**{r['speedup']:.2f}× faster**)"
                      for row, r in sizes.items()] + [""]
        paper = paper_table(s.domains)
        if paper and info["target_fraction"] == 1.0:
            dataset, rows = paper
            lines += [f"Beside the paper's {dataset} table (**recalled, not checked against the PDF**; "
                      "BERT-base → TinyBERT-4L there, a smaller setting here):", "",
                      "| row | ours Avg | paper Avg | ours − paper |", "|---|---|---|---|"]
            for row, paper_avg in rows.items():
                if row in info["rows"]:
                    ours = info["rows"][row]["avg"]["mean"] * 100
                    lines.append(f"| {row} | {ours:.1f} | {paper_avg:.1f} | {ours - paper_avg:+.1f} |")
            lines.append("")
    if reductions:
        lines += ["## Reductions against the paper's protocol", ""] + [f"- {r}" for r in reductions] + [""]
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    sources = [r["source"] for s in settings for r in s.runs]
    lines += ["## Sources", ""] + [f"- `{src}`" for src in sources] + [""]
    return "\n".join(lines)


def _margin_lines(margins_: dict) -> list[str]:
    """The Meta-KD-minus-baseline list and its one-line conclusion."""
    lines = ["Meta-KD minus each baseline student (domain average, points; 95 % interval from a paired bootstrap "
             "over seeds and test examples; \"ahead\"/\"behind\" only when it excludes 0):", ""]
    for other, m in margins_.items():
        spread = (f"seed std {m['paired_std'] * 100:.1f}, ahead on {m['seeds_ahead']}/{m['seeds']} seeds"
                  if m["seeds"] > 1 else "one seed: the interval is over test examples only")
        if "ci" in m:
            lo, hi = m["ci"]
            lines.append(f"- vs `{other}`: {m['diff'] * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}] "
                         f"→ **{m['verdict']}** ({spread})")
        else:
            lines.append(f"- vs `{other}`: {m['diff'] * 100:+.1f} (no per-example test results in these runs, "
                         f"so no interval; {spread})")
    verdicts = [m.get("verdict") for m in margins_.values()]
    if all(v == "ahead" for v in verdicts):
        conclusion = "Meta-KD is ahead of every baseline student in this setting (every interval excludes 0)."
    elif None in verdicts:
        conclusion = "Without intervals these differences decide nothing; rerun to get per-example results."
    else:
        conclusion = ("Meta-KD is not ahead of every baseline student in this setting: "
                      + ", ".join(f"{v} `{o}`" for o, v in zip(margins_, verdicts) if v != "ahead") + ".")
    return lines + ["", conclusion, ""]


def size_and_speed(info: dict) -> dict[str, dict]:
    """Each student row's parameters and latency against its teacher's (the meta-teacher for
    no_kd): compression = teacher params / student params, speedup = teacher ms / student ms."""
    rows, out = info["rows"], {}
    for row, cell in rows.items():
        teacher = rows.get(TEACHER_OF.get(row, "teacher meta"), {})
        if row.startswith("teacher ") or not all(x.get(k) for x in (cell, teacher) for k in ("params", "latency_ms")):
            continue
        out[row] = {"params": cell["params"], "teacher_params": teacher["params"],
                    "latency_ms": cell["latency_ms"], "teacher_latency_ms": teacher["latency_ms"],
                    "compression": teacher["params"] / cell["params"],
                    "speedup": teacher["latency_ms"] / cell["latency_ms"]}
    return out


def teacher_gaps(info: dict) -> dict[str, tuple[str, float]]:
    rows = info["rows"]
    return {row: (teacher, (rows[teacher]["avg"]["mean"] - rows[row]["avg"]["mean"]) * 100)
            for row, teacher in TEACHER_OF.items() if row in rows and teacher in rows}


def reductions_vs_paper(settings: list[Setting]) -> list[str]:
    """What each setting runs smaller than the paper's protocol (the ``amazon`` preset's values)."""
    from metakd_ray.config import load_config

    paper = load_config("amazon").to_dict()
    keys = [("data", "max_length"), ("data", "max_train_per_domain"), ("data", "max_dev_per_domain"),
            ("data", "max_test_per_domain"), ("teacher", "epochs"), ("teacher", "lr"), ("teacher", "batch_size"),
            ("distill", "stage1_epochs"), ("distill", "stage1_lr"), ("distill", "stage2_epochs"),
            ("distill", "stage2_lr"), ("distill", "temperature"), ("distill", "batch_size"),
            ("distill", "stage1_schedule"), ("data", "truncation"), ("general", "epochs"),
            ("model", "teacher"), ("model", "student_layers"), ("model", "student_init"), ("model", "student_hidden"),
            ("distill", "unlabelled_per_domain"), ("general", "unlabelled_per_domain"), ("distill", "attention_target")]
    out = []
    for s in settings:
        cfg = s.config
        diffs = [f"{a}.{b} = {cfg[a][b]} (paper protocol: "
                 f"{'all' if b.startswith('max_') and paper[a][b] == 0 else paper[a][b]})"
                 for a, b in keys if b in cfg.get(a, {}) and cfg[a][b] != paper[a][b]]
        if diffs:
            out.append(f"`{s.name}`: " + "; ".join(diffs))
    if out:
        out.append("Model: the paper distils BERT-base (12 layers, 768 wide) into the general-distilled "
                   "TinyBERT-4L-312; here the teacher is `model.teacher` (MiniLM-L6, 384 wide) and the student has "
                   "`model.student_layers` layers (2: the same 3:1 depth ratio), general-distilled from the "
                   "pretrained teacher on the domains' training text when `model.student_init` is `general`.")
    return out


# --------------------------------------------------------------------------- figures


def curve_histories(settings: list[Setting], metric: str = "val/acc") -> dict:
    """{setting: {row: {domain: [(step, value)]}}} from MLflow, for each setting's first seed."""
    from mlflow import MlflowClient

    out: dict = {}
    for s in settings:
        first = s.runs[0]
        uri = first.get("mlflow", {}).get("tracking_uri")
        if not uri:
            continue
        client = MlflowClient(uri)
        for row in s.rows():
            if row.startswith("teacher "):
                continue
            for d, cell in first["students"].get(row, {}).items():
                try:
                    history = client.get_metric_history(cell["run_id"], metric)
                except Exception:  # store moved or unreachable: curves are optional
                    continue
                out.setdefault(s.name, {}).setdefault(row, {})[d] = sorted((m.step, m.value) for m in history)
    return out


# --------------------------------------------------------------------------- entry point


def build_report(results: list[dict], out_dir: Path, log_to_mlflow: bool = True) -> dict:
    """Write report.md, report.json and the figures to ``out_dir`` (atomically); return the summary."""
    settings = group(results)
    summary = summarize(settings)
    reductions = reductions_vs_paper(settings)
    gaps = [(row if len(settings) == 1 else f"{row} [{s.name}]", gap)
            for s in settings for row, (_, gap) in teacher_gaps(summary[s.name]).items()]
    with atomic_dir(out_dir) as tmp:
        figures = ["heatmap.png"]
        plots.heatmap(settings, summary, tmp / "heatmap.png")
        if plots.size_latency(settings, summary, tmp / "size_latency.png"):
            figures.append("size_latency.png")
        if plots.gaps(gaps, tmp / "gap.png"):
            figures.append("gap.png")
        if plots.curves(settings, curve_histories(settings), tmp / "curves.png"):
            figures.append("curves.png")
        (tmp / "report.md").write_text(markdown(settings, summary, reductions, figures))
        (tmp / "report.json").write_text(json.dumps({"settings": summary, "reductions": reductions}, indent=2) + "\n")
    if log_to_mlflow:
        log_report(results, out_dir)
    print(markdown_table_preview(settings, summary))
    print(f"report: {out_dir / 'report.md'}")
    return summary


def log_report(results: list[dict], out_dir: Path) -> None:
    """Copy the report to each run's MLflow parent run and to each run's ``ray.storage_path`` copy."""
    from mlflow import MlflowClient

    from metakd_ray.outputs import Store

    parents = {(r["mlflow"]["tracking_uri"], r["mlflow"]["parent_run_id"]) for r in results if r.get("mlflow")}
    for uri, run_id in sorted(parents):
        try:
            MlflowClient(uri).log_artifacts(run_id, str(out_dir), "report")
        except Exception as exc:  # the report itself is written; a moved store only loses the copy
            print(f"[report] could not log to MLflow run {run_id} at {uri}: {type(exc).__name__}: {exc}")
    for uri in sorted({r["storage"] for r in results if r.get("storage")}):
        try:
            Store(uri).put(out_dir, "report")
            print(f"[report] copied to {uri}/report")
        except Exception as exc:
            print(f"[report] could not copy to {uri}: {type(exc).__name__}: {exc}")


def markdown_table_preview(settings: list[Setting], summary: dict) -> str:
    tables = [text_table([s.name + " (test %)"] + [d[:11] for d in s.domains] + ["Avg"],
                         [[row] + _row_cells(cell, s.domains) for row, cell in summary[s.name]["rows"].items()],
                         [28] + [15] * (len(s.domains) + 1))
              for s in settings]
    return "\n\n".join(tables) + "\n"
