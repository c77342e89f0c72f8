"""Using a trained student (or teacher) outside the pipeline: predict, export to ONNX, measure.

    metakd-ray predict outputs/quickstart/students/meta_kd/books/model "A gripping read." "Dull."
    metakd-ray predict MODEL_DIR --file reviews.csv            # .txt lines, or csv/jsonl/parquet with `text`
    metakd-ray export  MODEL_DIR --onnx --int8                 # MODEL_DIR/onnx/{model,model-int8}.onnx

``export`` checks that ONNX Runtime agrees with PyTorch on the model's test split (or ``--file``)
and prints a size/latency table: teacher vs student, PyTorch vs ONNX fp32 vs dynamic int8, batch 1
and batch 32, one CPU thread, timed after warm-up by ``torch.utils.benchmark``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from metakd_ray.errors import MetaKDError
from metakd_ray.io import atomic_file, atomic_write_json, text_table
from metakd_ray.models import load_model
from metakd_ray.training import time_ms

TEXT_SUFFIXES = (".txt", ".csv", ".jsonl", ".json", ".parquet")


@dataclass
class Examples:
    texts: list[str]
    pairs: list[str] | None = None  # second segment (MNLI hypothesis), if the model was trained on pairs
    labels: list | None = None  # gold labels (names or ids), when the file has them


def read_examples(path: Path, domain: str | None = None, limit: int | None = None) -> Examples:
    """Texts to classify from ``path``: a .txt file (one per line) or a csv/jsonl/parquet table
    with a ``text`` column (``text_pair`` and ``label`` optional; a ``domain`` column is filtered
    to ``domain``), or a split of the token cache (``.arrow``, memory-mapped); at most ``limit``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise MetaKDError(f"{path}: no such file (expected {', '.join(TEXT_SUFFIXES)})")
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES + (".arrow",):
        raise MetaKDError(f"{path}: unknown file type {suffix!r} (expected {', '.join(TEXT_SUFFIXES)})")
    if suffix == ".txt":
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return Examples(texts[:limit])
    readers = {".csv": pcsv.read_csv, ".parquet": pq.read_table, ".arrow": _read_arrow}
    try:
        table = readers.get(suffix, pjson.read_json)(str(path))
    except Exception as exc:
        raise MetaKDError(f"{path}: cannot read it as {suffix[1:]} ({str(exc).splitlines()[0][:200]})") from None
    if "text" not in table.column_names:
        raise MetaKDError(f"{path}: no 'text' column (found: {', '.join(table.column_names)})")
    if domain and "domain" in table.column_names:
        table = table.filter(pc.equal(table.column("domain"), pa.scalar(domain)))
    table = table.select([c for c in ("text", "text_pair", "label") if c in table.column_names]).slice(0, limit)
    rows = table.to_pylist()
    pairs = [r.get("text_pair") or "" for r in rows]
    return Examples([r["text"] for r in rows], pairs if any(pairs) else None,
                    [r["label"] for r in rows] if "label" in table.column_names else None)


def _read_arrow(path: str):
    import pyarrow as pa

    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()


class Classifier:
    """A saved model with its tokenizer: texts in, labels and probabilities out (CPU or ``device``)."""

    def __init__(self, model_dir: Path, device: str = "cpu"):
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        self.model, self.info = load_model(self.model_dir)
        self.model.to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> dict:
        return dict(self.tokenizer(texts, pairs, truncation=True, padding=True, return_tensors="pt"))

    @torch.no_grad()
    def logits(self, examples: Examples, batch_size: int = 32) -> np.ndarray:
        out = []
        device = next(self.model.parameters()).device
        for start in range(0, len(examples.texts), batch_size):
            pairs = examples.pairs[start:start + batch_size] if examples.pairs else None
            batch = self.encode(examples.texts[start:start + batch_size], pairs)
            out.append(self.model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def gold_ids(self, examples: Examples) -> np.ndarray | None:
        """Gold labels as class ids (names or ids accepted); None when the examples have none."""
        if examples.labels is None:
            return None
        index = {name: i for i, name in enumerate(self.labels)}
        try:
            return np.array([int(x) if isinstance(x, (int, np.integer)) else index[str(x)] for x in examples.labels])
        except KeyError as exc:
            raise MetaKDError(f"label {exc.args[0]!r} is not one of the model's labels ({', '.join(self.labels)})") \
                from None


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def predict(model_dir: Path, texts: list[str], file: Path | None, as_json: bool) -> list[dict]:
    """Classify ``texts`` or the rows of ``file``; print one line (or JSON object) per example,
    and the accuracy when the file has gold labels."""
    classifier = Classifier(model_dir)
    examples = read_examples(file, classifier.info.get("domain")) if file else Examples(list(texts))
    if not examples.texts:
        raise MetaKDError("predict: nothing to classify (give TEXT arguments or --file with at least one row)")
    probs = softmax(classifier.logits(examples))
    rows = [{"text": t, "label": classifier.labels[int(p.argmax())], "score": round(float(p.max()), 4)}
            for t, p in zip(examples.texts, probs)]
    for row in rows:
        print(json.dumps(row) if as_json else f"{row['label']}\t{row['score']:.4f}\t{row['text'][:100]}")
    gold = classifier.gold_ids(examples)
    if gold is not None and not as_json:
        print(f"accuracy {float((probs.argmax(-1) == gold).mean()):.4f} on {len(gold)} labelled examples")
    return rows


# --------------------------------------------------------------------------- ONNX


class _LogitsOnly(torch.nn.Module):
    """The classifier path of the model with a fixed signature (what ONNX exports)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def export_onnx(classifier: Classifier, path: Path) -> Path:
    """fp32 ONNX graph of ``classifier``'s logits, dynamic in batch and sequence length."""
    sample = classifier.encode(["a short example", "and a second, slightly longer example to pad"])
    with warnings.catch_warnings(), atomic_file(path) as tmp:
        warnings.simplefilter("ignore")  # the tracer's notes on Python control flow in the encoder
        torch.onnx.export(_LogitsOnly(classifier.model.cpu().eval()), tuple(sample[k] for k in ONNX_INPUTS), str(tmp),
                          input_names=list(ONNX_INPUTS), output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={**{k: {0: "batch", 1: "sequence"} for k in ONNX_INPUTS},
                                        "logits": {0: "batch"}})
    return path


def quantize_int8(fp32: Path, path: Path) -> Path:
    """Dynamic int8 quantisation of the weights of the linear layers (activations stay fp32)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("root").setLevel(logging.ERROR)  # onnxruntime warns about pre-processing on every call
    with atomic_file(path) as tmp:
        quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8)
    return path


def onnx_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session, classifier: Classifier, examples: Examples, batch_size: int = 32) -> np.ndarray:
    out = []
    for start in range(0, len(examples.texts), batch_size):
        pairs = examples.pairs[start:start + batch_size] if examples.pairs else None
        batch = classifier.encode(examples.texts[start:start + batch_size], pairs)
        out.append(session.run(["logits"], {k: batch[k].numpy() for k in ONNX_INPUTS})[0])
    return np.concatenate(out)


def export(model_dir: Path, int8: bool, file: Path | None = None, teacher_dir: Path | None = None,
           min_agreement: float = 0.97) -> dict:
    """Write ``MODEL_DIR/onnx/model.onnx`` (and ``model-int8.onnx``), check them against PyTorch,
    time everything, write ``MODEL_DIR/onnx/export.json`` and print the table."""
    model_dir = Path(model_dir)
    classifier = Classifier(model_dir)
    examples = _check_examples(classifier, model_dir, file)
    out_dir = model_dir / "onnx"
    reference = classifier.logits(examples)
    variants = {"onnx fp32": export_onnx(classifier, out_dir / "model.onnx")}
    if int8:
        variants["onnx int8"] = quantize_int8(variants["onnx fp32"], out_dir / "model-int8.onnx")
    source = file or "the model's test split"
    print(f"[export] checking against PyTorch on {len(examples.texts)} examples from {source}")
    checks = {}
    for name, path in variants.items():
        logits = onnx_logits(onnx_session(path), classifier, examples)
        agreement = float((logits.argmax(-1) == reference.argmax(-1)).mean())
        checks[name] = {"path": str(path), "label_agreement": agreement,
                        "max_abs_logit_diff": float(np.abs(logits - reference).max())}
        floor = 1.0 if name == "onnx fp32" else min_agreement
        if agreement < floor:
            raise MetaKDError(f"export: {name} agrees with PyTorch on only {agreement:.2%} of the examples "
                              f"(expected at least {floor:.0%}); {path} is not safe to ship")
    teacher = teacher_dir or default_teacher(model_dir, classifier.info)
    table = speed_table(classifier, variants, examples, Classifier(teacher) if teacher else None)
    summary = {"model": str(model_dir), "checks": checks, "speed": table,
               "teacher": str(teacher) if teacher else None}
    atomic_write_json(out_dir / "export.json", summary)
    for name, check in checks.items():
        print(f"[export] {name}: {check['path']} agrees with PyTorch on {check['label_agreement']:.2%} of labels "
              f"(max |Δlogit| {check['max_abs_logit_diff']:.2e})")
    print(format_speed_table(table))
    return summary


def _check_examples(classifier: Classifier, model_dir: Path, file: Path | None) -> Examples:
    source = Path(file) if file else classifier.info.get("test_split")
    if not source or not Path(source).is_file():
        raise MetaKDError(f"export: no examples to check the ONNX model with ({model_dir} records no test split "
                          "that exists here); pass --file with a .txt/.csv/.jsonl/.parquet of texts")
    examples = read_examples(Path(source), classifier.info.get("domain"))
    if not examples.texts:
        raise MetaKDError(f"export: {source} has no examples for domain {classifier.info.get('domain')!r}")
    return examples


def default_teacher(model_dir: Path, info: dict) -> Path | None:
    """The teacher a pipeline student distilled from (the meta-teacher for no_kd), when it sits in
    the same output directory: ``<out>/students/<method>/<domain>/model`` -> ``<out>/teachers/<name>/model``."""
    if info.get("kind") != "student":
        return None
    teachers = Path(model_dir).resolve().parents[3] / "teachers"
    for name in (info.get("teacher"), "meta", "mix"):
        if name and (teachers / name / "model" / "config.json").is_file():
            return teachers / name / "model"
    return None


def speed_table(student: Classifier, variants: dict[str, Path], examples: Examples,
                teacher: Classifier | None) -> list[dict]:
    """Size and batch-1 / batch-32 latency of each variant, one CPU thread."""
    batches = {}
    for size in (1, 32):
        idx = [i % len(examples.texts) for i in range(size)]
        batches[size] = student.encode([examples.texts[i] for i in idx],
                                       [examples.pairs[i] for i in idx] if examples.pairs else None)
    rows = []
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for name, classifier in (("teacher pytorch fp32", teacher), ("student pytorch fp32", student)):
            if classifier is None:
                continue
            model = classifier.model.cpu().eval()
            row = {"model": name, "params": sum(p.numel() for p in model.parameters()),
                   "size_mb": _weights_mb(classifier.model_dir)}
            for size, batch in batches.items():
                with torch.no_grad():
                    row[f"batch{size}_ms"] = time_ms(lambda b=batch: model(**b))
            rows.append(row)
        for name, path in variants.items():
            session = onnx_session(path)
            row = {"model": f"student {name}", "params": rows[-1]["params"], "size_mb": path.stat().st_size / 1e6}
            for size, batch in batches.items():
                feed = {k: batch[k].numpy() for k in ONNX_INPUTS}
                row[f"batch{size}_ms"] = time_ms(lambda f=feed: session.run(["logits"], f))
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    base = rows[0]
    for row in rows:
        row["smaller"] = base["size_mb"] / row["size_mb"]
        row["faster_batch1"] = base["batch1_ms"] / row["batch1_ms"]
    return rows


def _weights_mb(model_dir: Path) -> float:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")) / 1e6


def format_speed_table(rows: list[dict]) -> str:
    base = rows[0]["model"]
    body = [[r["model"], f"{r['params'] / 1e6:.1f} M", f"{r['size_mb']:.1f}", f"{r['batch1_ms']:.2f}",
             f"{r['batch32_ms']:.1f}", f"{r['smaller']:.1f}x", f"{r['faster_batch1']:.1f}x"] for r in rows]
    return (text_table(["model", "params", "MB", "b1 ms", "b32 ms", "smaller", "faster b1"], body,
                       [24, 9, 8, 8, 8, 8, 10])
            + f"\n(one CPU thread, median after warm-up; ratios against {base})")


# --------------------------------------------------------------------------- MLflow model


with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # importing mlflow.pyfunc warns about MLflow's own type hints
    from mlflow.pyfunc import PythonModel


class MLflowClassifier(PythonModel):
    """The ``mlflow.pyfunc`` face of a saved model: a DataFrame with ``text`` (and ``text_pair``)
    in, ``label`` and ``score`` out. Logged by ``tracking.log_model``."""

    classifier: Classifier | None = None

    def load_context(self, context):
        self.classifier = Classifier(Path(context.artifacts["model"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        pairs = model_input["text_pair"].tolist() if "text_pair" in model_input else None
        probs = softmax(self.classifier.logits(Examples(model_input["text"].astype(str).tolist(), pairs)))
        return pd.DataFrame({"label": [self.classifier.labels[i] for i in probs.argmax(-1)],
                             "score": probs.max(-1).astype(float)})
