"""How a run's time, memory and disk grow with its data: a grid of texts per domain x teacher-signal mode.

    .venv/bin/python bench/scale.py                       # auto at 1k, 4k, 16k, 64k texts per domain; cache, live to 4k
    .venv/bin/python bench/scale.py --sizes 1000 4000 --modes auto
    .venv/bin/python bench/scale.py --cap-size 64000      # every mode at every size

Each point is one whole `metakd-ray run` of a fresh output directory on a local Ray cluster that
this benchmark starts (and stops), on the shipped MultiNLI text: two genres, N/2 labelled pairs per
genre for the teacher and the students and N/2 more as the students' transfer set
(`data.unlabelled_path`), so a student reads N texts; pairs are repeated with a numbered suffix to
reach N. Stage 1 runs 1.1 epochs (stage 2 a quarter, batch 64), so `auto` caches the teacher's
hidden states while they fit `distill.cache_budget_gb` (0.5 GB here) and runs the teacher live
past it. Models: a random BERT of MiniLM's vocabulary, 2 layers x 64 wide, as the teacher and its
first layer as the student, so a 64k point takes minutes (what is measured is how the costs grow
with N); 128 tokens. The two runs of the `mnli` preset (below) use the real MiniLM-L6 -> 2 layers.

Measured per point: wall seconds of every stage (results.json); the peak RSS of every kind of
process (sampled from /proc every 0.25 s: the driver, teacher workers, teacher-pass tasks, student
tasks), in all, without shared pages (the object store's, which a process maps to read an
object: counted once, apart) and anonymous only (RssAnon, without libraries and memory-mapped
caches); the machine's used memory above its level before the run; the object
store's peak; the bytes on disk. Per series it fits cost = a + b·N and reports (cost - a)/N at
every N (flat when the cost is linear), and it projects bytes and memory to full MultiNLI and to
1M texts per domain for the mnli preset's model.

Writes bench/results/scale.json and scale.md and prints the table. Reports, never asserts.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WORK = REPO / "bench" / "out" / "scale"
MNLI = Path(os.environ.get("METAKD_DATA_ROOT", REPO.parent / "shared" / "data")) / "mnli-5genre-subset"
GENRES = ("fiction", "government")
MODES = ("auto", "cache", "live")
# process kinds by their title (Ray names a worker process after the task or actor it runs)
KINDS = {"teacher worker": re.compile(r"^ray::RayTrainWorker"), "teacher pass": re.compile(r"^ray::teacher_outputs_task"),
         "student task": re.compile(r"^ray::_student_task")}
MNLI_FULL = 392_702  # MultiNLI training pairs over the five genres
sys.path.insert(0, str(REPO / "bench"))


# --------------------------------------------------------------------------- data


def make_data(n: int) -> tuple[Path, Path]:
    """(labelled CSV, unlabelled JSONL) with n/2 labelled training pairs and n/2 unlabelled pairs per
    genre, repeated from the shipped subset; dev and test are a tenth of the labelled rows each."""
    directory = WORK / "data" / str(n)
    labelled, unlabelled = directory / "labelled.csv", directory / "unlabelled.jsonl"
    if labelled.is_file() and unlabelled.is_file():
        return labelled, unlabelled
    directory.mkdir(parents=True, exist_ok=True)
    rows = {g: [] for g in GENRES}
    for name in ("mnli_train.tsv", "mnli_val.tsv"):
        with open(MNLI / name, encoding="utf-8") as fh:
            for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
                if r["genre"] in rows:
                    rows[r["genre"]].append(r)
    n_labelled = int(round(n / 2 / 0.8))  # 80 % of them train after the 10 % test and 10 % dev splits
    with open(labelled, "w", newline="", encoding="utf-8") as fl, open(unlabelled, "w", encoding="utf-8") as fu:
        writer = csv.writer(fl)
        writer.writerow(["text", "text_pair", "label", "domain"])
        for genre, source in rows.items():
            for i in range(n_labelled + n // 2):
                r = source[i % len(source)]
                pair = f"{r['sentence2']} #{i // len(source)}" if i >= len(source) else r["sentence2"]
                if i < n_labelled:
                    writer.writerow([r["sentence1"], pair, r["label"], genre])
                else:
                    fu.write(json.dumps({"text": r["sentence1"], "text_pair": pair + " ~", "domain": genre}) + "\n")
    return labelled, unlabelled


TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256}


def tiny_teacher() -> Path:
    """A BERT of MiniLM's vocabulary and tokenizer, 2 layers x 64 wide (random weights, seed 0),
    saved once: the grid measures what grows with N, and this keeps a 64k point to minutes."""
    path = WORK / "teacher"
    if not (path / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from metakd_ray.config import model_path

        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(model_path("minilm"))
        for key, value in TINY.items():
            setattr(config, key, value)
        AutoModel.from_config(config).save_pretrained(path)
        AutoTokenizer.from_pretrained(model_path("minilm")).save_pretrained(path)
    return path


def write_config(n: int, mode: str, out: Path) -> Path:
    labelled, unlabelled = make_data(n)
    cfg = {
        "name": f"scale-{n}-{mode}", "output_dir": str(out), "seed": 42,
        "data": {"format": "csv", "root": str(labelled.parent), "path": labelled.name,
                 "unlabelled_path": unlabelled.name, "domains": list(GENRES),
                 "labels": ["entailment", "neutral", "contradiction"], "text_pair_column": "text_pair",
                 "max_length": 128},
        "model": {"teacher": str(tiny_teacher()), "student_layers": 1, "pooling": "mean"},
        "teacher": {"epochs": 0.25, "batch_size": 32, "lr": 5e-5, "eval_every": 100, "num_workers": 2},
        "distill": {"methods": ["meta_kd"], "stage1_epochs": 1.1, "stage2_epochs": 0.25, "batch_size": 64,
                    "eval_every": 200, "teacher_signals": mode, "cache_budget_gb": 0.5},
        "tracking": {"experiment": f"scale-{n}-{mode}"},
    }
    path = out.parent / f"{out.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------------------------- measuring


class Sampler(threading.Thread):
    """Peak RSS per process kind (max over processes of the kind), also without the shared pages
    (the object store's, mapped into every process that reads an object: measured apart) and as
    anonymous memory alone (RssAnon: the process's own heap, without the libraries and memory-mapped
    files that the kernel can drop and re-read), the machine's used memory and the object store's
    use, sampled while a run goes on."""

    def __init__(self, driver_pid: int, address: str, every: float = 0.25):
        super().__init__(daemon=True)
        self.driver, self.address, self.every = driver_pid, address, every
        self.peak = {"driver": 0, **{k: 0 for k in KINDS}}
        self.private, self.anon = dict(self.peak), dict(self.peak)
        self.used0, self.used_peak, self.store_peak = used_memory(), 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        last_store = 0.0
        while not self.stop.is_set():
            for pid, title, rss, private, anon in processes():
                kind = "driver" if pid == self.driver else next((k for k, p in KINDS.items() if p.match(title)), None)
                if kind:
                    self.peak[kind] = max(self.peak[kind], rss)
                    self.private[kind] = max(self.private[kind], private)
                    self.anon[kind] = max(self.anon[kind], anon)
            self.used_peak = max(self.used_peak, used_memory() - self.used0)
            if time.time() - last_store > 2:
                self.store_peak = max(self.store_peak, object_store_bytes(self.address))
                last_store = time.time()
            time.sleep(self.every)


def processes():
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            status = {line.split(":")[0]: line.split()[1] for line in (entry / "status").read_text().splitlines()
                      if line.startswith(("VmRSS:", "RssShmem:", "RssAnon:"))}
            rss = int(status["VmRSS"]) * 1024
        except (OSError, KeyError):
            continue
        yield (int(entry.name), title, rss, rss - int(status.get("RssShmem", 0)) * 1024,
               int(status.get("RssAnon", 0)) * 1024)


def used_memory() -> int:
    info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}
    return info["MemTotal"] - info["MemAvailable"]


def object_store_bytes(address: str) -> int:
    """Plasma bytes in use on the cluster (``ray memory --stats-only``)."""
    try:
        out = subprocess.run([str(Path(sys.executable).parent / "ray"), "memory", "--stats-only", "--address", address],
                             capture_output=True, text=True, timeout=30, env=ray_env()).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    found = re.search(r"Plasma memory usage (\d+) MiB", out)
    return int(found.group(1)) * 2**20 if found else 0


def disk_bytes(path: Path) -> dict:
    """Bytes on disk under each top-level entry of ``path`` (hard links counted once)."""
    seen, out = set(), {}
    for top in sorted(path.iterdir()):
        total = 0
        for f in [top] if top.is_file() else top.rglob("*"):
            st = f.lstat()
            if f.is_file() and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
        out[top.name] = total
    return out


def ray_env() -> dict:
    return dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def start_cluster() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, "start", "--head", "--port", str(port), "--num-cpus", str(os.cpu_count()),
                    "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--disable-usage-stats"],
                   check=True, capture_output=True, env=ray_env())
    return f"127.0.0.1:{port}"


def stop_cluster() -> None:
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, env=ray_env())


def run_point(n: int, mode: str, address: str) -> dict:
    out = WORK / "runs" / f"{n}-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    return dict(measure_run([str(write_config(n, mode, out))], out, address), texts_per_domain=n, mode=mode)


def measure_run(command: list[str], out: Path, address: str) -> dict:
    """`metakd-ray run COMMAND` writing to ``out``, sampled while it runs."""
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(ray_env(), RAY_ADDRESS=address, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    started = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "metakd-ray"), "run", *command], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        sampler = Sampler(proc.pid, address)
        sampler.start()
        code = proc.wait()
        sampler.stop.set()
        sampler.join()
    wall = time.time() - started
    text = log.read_text()
    if code != 0:
        raise SystemExit(f"scale: `metakd-ray run {' '.join(command)}` failed (exit {code}); see {log}:\n{text[-2000:]}")
    results = json.loads((out / "results.json").read_text())
    line = next((l for l in text.splitlines() if l.startswith("[distill] teacher signals")), "")
    return {"wall_seconds": round(wall, 1), "stage_seconds": results["stage_seconds"], "peak_rss_bytes": sampler.peak,
            "peak_private_bytes": sampler.private, "peak_anon_bytes": sampler.anon,
            "used_memory_rise_bytes": sampler.used_peak, "object_store_peak_bytes": sampler.store_peak,
            "disk_bytes": disk_bytes(out), "signals_line": line,
            "mean_dev_acc": float(np.mean([c["dev_acc"] for c in results["students"]["meta_kd"].values()]))}


# The `mnli` preset on the whole shipped subset (128 tokens), its teacher and students cut to a
# few steps: (name, overrides). Its stage 1 (10 epochs) reads each pair 10 times, so `auto` caches
# 2 genres (within the 2 GB budget) and runs the teacher live for 5: each is run in that mode.
MNLI_RUNS = (("mnli, 2 genres, cache", ["data.domains=[fiction,government]", "teacher.epochs=0.05",
                                        "distill.teacher_signals=cache"]),
             ("mnli, 5 genres, live", ["teacher.epochs=0.02", "distill.teacher_signals=live"]))
MNLI_CUT = ["distill.stage1_epochs=0.016", "distill.stage2_epochs=0.016", "distill.no_kd_epochs=0.016"]


def run_mnli(name: str, overrides: list[str], address: str) -> dict:
    out = WORK / "runs" / re.sub(r"\W+", "-", name)
    shutil.rmtree(out, ignore_errors=True)
    preset = subprocess.run([str(Path(sys.executable).parent / "metakd-ray"), "prepare", "mnli",
                             f"output_dir={out}-prepare", *[o for o in overrides if "teacher_signals" not in o]],
                            capture_output=True, text=True,
                            env=ray_env(), cwd=str(REPO))
    shutil.rmtree(f"{out}-prepare", ignore_errors=True)
    auto = next((l for l in preset.stdout.splitlines() if l.startswith("[distill] teacher signals")), "")
    point = measure_run(["mnli", f"output_dir={out}", *overrides, *MNLI_CUT], out, address)
    return dict(point, name=name, preset_signals_line=auto)


# --------------------------------------------------------------------------- analysis


def fit(ns: list[int], values: list[float]) -> tuple[float, float]:
    """Least-squares (a, b) of value = a + b·N."""
    b, a = np.polyfit(np.asarray(ns, float), np.asarray(values, float), 1)
    return float(a), float(b)


def analyse(points: list[dict]) -> dict:
    out = {}
    for mode in sorted({p["mode"] for p in points}):
        rows = sorted((p for p in points if p["mode"] == mode), key=lambda p: p["texts_per_domain"])
        ns = [p["texts_per_domain"] for p in rows]
        texts = [2 * n for n in ns]  # two genres
        series = {f"seconds/{s}": [p["stage_seconds"].get(s, 0.0) for p in rows] for s in rows[0]["stage_seconds"]}
        series["seconds/run"] = [p["wall_seconds"] for p in rows]
        series.update({f"rss/{k}": [p["peak_rss_bytes"][k] for p in rows] for k in rows[0]["peak_rss_bytes"]})
        series.update({f"private/{k}": [p["peak_private_bytes"][k] for p in rows] for k in rows[0]["peak_private_bytes"]})
        series.update({f"anon/{k}": [p["peak_anon_bytes"][k] for p in rows] for k in rows[0]["peak_anon_bytes"]})
        series["disk/total"] = [sum(p["disk_bytes"].values()) for p in rows]
        series["memory/used rise"] = [p["used_memory_rise_bytes"] for p in rows]
        series["memory/object store"] = [p["object_store_peak_bytes"] for p in rows]
        mode_out = {"texts_per_domain": ns, "series": {}}
        for name, values in series.items():
            entry = {"values": values}
            if len(ns) >= 2:
                a, b = fit(texts, values)
                per = [(v - a) / t for v, t in zip(values, texts)]
                entry.update(intercept=a, slope_per_text=b, marginal_per_text=per)
                if name.startswith(("rss/", "private/", "anon/", "memory/")):
                    entry["spread"] = (max(values) - min(values)) / min(values) if min(values) > 0 else None
                else:
                    positive = [x for x in per if x > 0]
                    entry["spread"] = (max(positive) / min(positive) - 1) if len(positive) == len(per) else None
            mode_out["series"][name] = entry
        out[mode] = mode_out
    return out


PRESET = {"width": 384, "stored": 5, "classes": 3}  # the mnli preset: MiniLM-L6 -> 2 layers, layer map [3, 6]


def projections(analysis: dict, points: list[dict], mnli: list[dict]) -> dict:
    """Disk and memory at full MultiNLI and at 1M texts per domain (2 domains), for the mnli preset's
    shape: the fitted bytes per text of `live` (what `auto` does past its budget) and of `cache`,
    with the soft labels and hidden states rescaled from the grid's model (2 x 64, 3 stored layers)
    to MiniLM's (H = 384, 5 stored layers); memory is the largest peak of each process kind in the
    mnli preset runs (the grid shows it does not grow with N), the driver and two workers at once."""
    tokens = [float(m.group(1)) * 1e3 / (3 * TINY["hidden_size"] * 2) for p in points
              if (m := re.search(r"~(\d+) KB per text", p["signals_line"]))]
    per_text_tokens = float(np.mean(tokens)) if tokens else 45.0
    soft = lambda width: (PRESET["classes"] + 2 + width) * 4  # noqa: E731
    rescale = {"live": soft(PRESET["width"]) - soft(TINY["hidden_size"]),
               "cache": soft(PRESET["width"]) - soft(TINY["hidden_size"])
               + per_text_tokens * 2 * (PRESET["stored"] * PRESET["width"] - 3 * TINY["hidden_size"])}
    peaks = {}
    for run in mnli:
        for kind, value in run["peak_private_bytes"].items():
            peaks[kind] = max(peaks.get(kind, 0), value)
    at_once = peaks.get("driver", 0) + 2 * max([v for k, v in peaks.items() if k != "driver"] or [0])
    out = {}
    for mode, extra in rescale.items():
        disk = analysis.get(mode, {}).get("series", {}).get("disk/total", {})
        if "slope_per_text" not in disk:
            continue
        per_text = disk["slope_per_text"] + extra
        out[mode] = {"bytes_per_text": per_text, "tokens_per_text": per_text_tokens,
                     **{name: {"disk_bytes": disk["intercept"] + per_text * texts, "memory_bytes_at_once": at_once}
                        for name, texts in (("full MultiNLI (392,702 pairs)", MNLI_FULL),
                                            ("1M texts per domain, 2 domains", 2_000_000))}}
    return out


def markdown(result: dict) -> str:
    lines = ["# How metakd-ray scales with its data", "", result["setup"], ""]
    for mode, a in result["analysis"].items():
        ns = a["texts_per_domain"]
        lines += [f"## teacher_signals: {mode}", "", "| measure | " + " | ".join(f"{n:,}" for n in ns)
                  + " | slope per text | spread |", "|---" * (len(ns) + 3) + "|"]
        for name, e in a["series"].items():
            unit, scale = ("MB", 1e6) if not name.startswith("seconds") else ("s", 1)
            slope = e.get("slope_per_text")
            slope_text = ("-" if slope is None else f"{slope * 1e3:.2f} ms" if unit == "s" else f"{slope / 1e3:.1f} KB")
            spread = e.get("spread")
            lines.append(f"| {name} ({unit}) | " + " | ".join(f"{v / scale:,.1f}" for v in e["values"])
                         + f" | {slope_text} | {'-' if spread is None else f'{spread * 100:+.0f} %'} |")
        lines.append("")
        for p in result["points"]:
            if p["mode"] == mode:
                lines.append(f"- {p['texts_per_domain']:,}: `{p['signals_line']}`")
        lines.append("")
    if result["mnli"]:
        lines += ["## The mnli preset on the shipped subset (128 tokens, teacher ~12 steps, students 2 steps)", "",
                  "| run | wall s | used memory rise GB | disk GB | peak RSS per process GB |", "|---|---|---|---|---|"]
        for p in result["mnli"]:
            rss = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in p["peak_rss_bytes"].items() if v)
            lines.append(f"| {p['name']} | {p['wall_seconds']:.0f} | {p['used_memory_rise_bytes'] / 1e9:.2f} | "
                         f"{sum(p['disk_bytes'].values()) / 1e9:.2f} | {rss} |")
        lines.append("")
        lines += [f"- {p['name']}, at the preset's own stage-1 length (`metakd-ray prepare`): "
                  f"`{p['preset_signals_line']}`" for p in result["mnli"]]
        lines.append("")
    lines += ["## Projections to the mnli preset's model (fitted bytes per text, rescaled; see projections())", "",
              "| mode | data | bytes per text | disk GB | memory of the driver and two workers GB |", "|---|---|---|---|---|"]
    for mode, per in result["projections"].items():
        for name, p in per.items():
            if isinstance(p, dict):
                lines.append(f"| {mode} | {name} | {per['bytes_per_text'] / 1e3:.1f} KB | {p['disk_bytes'] / 1e9:.1f} | "
                             f"{p['memory_bytes_at_once'] / 1e9:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000, 64000],
                        help="texts per domain (each student reads this many)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--cap-size", type=int, default=4000, metavar="N",
                        help="run the modes other than auto only at sizes up to N (auto alone goes past the cache budget)")
    parser.add_argument("--keep", action="store_true", help="keep each run's output directory (default: deleted)")
    parser.add_argument("--no-mnli", action="store_true", help="leave out the two runs of the mnli preset")
    args = parser.parse_args()

    from metakd_ray.io import atomic_write_json, atomic_write_text
    from teacher_throughput import machine_info

    WORK.mkdir(parents=True, exist_ok=True)
    tiny_teacher()
    stop_cluster()
    address = start_cluster()
    points = []
    started = time.time()
    signal.signal(signal.SIGTERM, lambda *_: (stop_cluster(), sys.exit(143)))
    machine = machine_info()

    def save() -> str:
        """The results so far, so an interrupted benchmark keeps every point it finished."""
        setup = (f"`bench/scale.py --sizes {' '.join(map(str, args.sizes))} --modes {' '.join(args.modes)} "
                 f"--cap-size {args.cap_size}`: "
                 f"{len(GENRES)} MultiNLI genres, N/2 labelled + N/2 unlabelled (data.unlabelled_path) pairs per genre, "
                 "a 2 x 64 BERT teacher, a 1-layer student, 128 tokens, stage 1 over 1.1 epochs, "
                 f"{os.cpu_count()} CPUs; {time.time() - started:.0f} s in all. Spread: (max - min) / min of the "
                 "marginal cost per text (seconds) or of the values (memory); slope: fitted per text (both genres).")
        analysis = analyse(points)
        result = {"setup": setup, "points": points, "analysis": analysis,
                  "projections": projections(analysis, points, mnli), "mnli": mnli, "machine": machine}
        md = markdown(result)
        atomic_write_json(RESULTS / "scale.json", result)
        atomic_write_text(RESULTS / "scale.md", md)
        return md

    mnli: list[dict] = []
    try:
        for n in args.sizes:
            for mode in args.modes:
                if mode != "auto" and n > args.cap_size:
                    continue
                print(f"[scale] {n:,} texts per domain, teacher_signals={mode}", flush=True)
                points.append(run_point(n, mode, address))
                p = points[-1]
                print(f"[scale]   {p['wall_seconds']:.0f}s, disk {sum(p['disk_bytes'].values()) / 1e6:.0f} MB, "
                      f"peak RSS " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in p["peak_rss_bytes"].items()),
                      flush=True)
                if not args.keep:
                    shutil.rmtree(WORK / "runs" / f"{n}-{mode}", ignore_errors=True)
                save()
        for name, overrides in () if args.no_mnli else MNLI_RUNS:
            print(f"[scale] {name}", flush=True)
            mnli.append(run_mnli(name, overrides, address))
            print(f"[scale]   used memory +{mnli[-1]['used_memory_rise_bytes'] / 1e9:.1f} GB, disk "
                  f"{sum(mnli[-1]['disk_bytes'].values()) / 1e9:.2f} GB", flush=True)
            save()
    finally:
        stop_cluster()
    print("\n" + save())
    print(f"wrote {RESULTS / 'scale.json'} and scale.md")


if __name__ == "__main__":
    main()
