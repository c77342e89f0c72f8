"""Config and data: real splits of the real data, caching, and every malformed input -> one error line, exit 2."""

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import AMAZON, MNLI, REPO, slice_reviews
from metakd_ray.cli import main
from metakd_ray.config import load_config


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code, err, *needles):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------- real data


def test_prepare_amazon_paper_protocol(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("METAKD_DATA_ROOT", str(AMAZON.parent))
    code, out, _ = run_cli(capsys, "prepare", "amazon", f"output_dir={tmp_path}")
    assert code == 0
    summary = json.loads((tmp_path / "splits.json").read_text())
    assert summary["domains"] == ["books", "dvd", "electronics", "kitchen"]
    assert summary["texts_in_two_splits"] == 0
    for domain, per in summary["counts"].items():
        # ~1620/180/200 before removing the 147 duplicate reviews
        assert 1560 <= per["train"]["total"] <= 1640, (domain, per)
        assert 170 <= per["dev"]["total"] <= 185
        assert 190 <= per["test"]["total"] <= 200
        for split in ("train", "dev", "test"):
            assert abs(per[split]["positive"] - per[split]["negative"]) <= 0.05 * per[split]["total"] + 1
    assert "books" in out and "texts in two splits: 0" in out

    # a second prepare with the same inputs re-tokenizes nothing
    cache = next((tmp_path / "cache").glob("data-*"))
    mtime = (cache / "train.arrow").stat().st_mtime_ns
    code, out, _ = run_cli(capsys, "prepare", "amazon", f"output_dir={tmp_path}")
    assert code == 0 and "reusing tokenized splits" in out
    assert (cache / "train.arrow").stat().st_mtime_ns == mtime
    # a different max length is a different cache entry
    code, out, _ = run_cli(capsys, "prepare", "amazon", f"output_dir={tmp_path}", "data.max_length=64")
    assert code == 0 and "tokenized" in out and len(list((tmp_path / "cache").glob("data-*"))) == 2


def test_prepare_mnli_groups_by_premise(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("METAKD_DATA_ROOT", str(MNLI.parent))
    code, _, _ = run_cli(capsys, "prepare", "mnli", f"output_dir={tmp_path}", "data.domains=[fiction,travel]",
                         "data.max_length=64")
    assert code == 0
    from metakd_ray.data.split import read_split

    cache = next((tmp_path / "cache").glob("data-*"))
    premises = {s: set(read_split(cache / f"{s}.arrow").table.column("text").to_pylist())
                for s in ("train", "dev", "test")}
    assert not premises["train"] & premises["test"] and not premises["train"] & premises["dev"]
    counts = json.loads((tmp_path / "splits.json").read_text())["counts"]
    assert set(counts) == {"fiction", "travel"}
    assert counts["fiction"]["train"]["total"] > 3000


def test_general_corpus_adds_unlabelled_training_text_only(tmp_path, monkeypatch):
    """general.unlabelled_per_domain adds texts from the training partition that
    max_train_per_domain left out: never a dev or test text, labels dropped, the labelled splits
    unchanged."""
    import numpy as np

    from metakd_ray.data.prepare import general_corpus, load_rows, prepare, split_rows

    monkeypatch.setenv("METAKD_DATA_ROOT", str(AMAZON.parent))
    overrides = [f"output_dir={tmp_path}", "data.domains=[books,kitchen]", "data.max_train_per_domain=20",
                 "data.max_dev_per_domain=30", "data.max_length=32"]
    cfg = load_config("amazon", overrides)
    data = prepare(cfg, quiet=True)
    assert general_corpus(cfg, data) is data.splits["train"]  # 0: the training split only

    cfg = load_config("amazon", overrides + ["general.unlabelled_per_domain=50"])
    rows, _ = load_rows(cfg)
    with_extra, without = split_rows(rows, cfg, 50), split_rows(rows, cfg)
    assert {k: v for k, v in with_extra.items() if k != "unlabelled"} == without
    again = prepare(cfg, quiet=True)
    assert again.key == data.key  # so the teachers trained on the labelled splits are reused
    corpus = general_corpus(cfg, again)
    train = data.splits["train"]
    assert len(corpus) == len(train) + 2 * 50
    assert list(corpus.uids[:len(train)]) == list(train.uids)
    extra = corpus.take(np.arange(len(train), len(corpus)))
    assert (extra.labels == -1).all() and np.bincount(extra.domain_ids).tolist() == [50, 50]
    assert len(set(extra.uids)) == 100
    assert not set(extra.uids) & set(np.concatenate([s.uids for s in data.splits.values()]))
    assert corpus.lengths.max() <= 32 and (corpus.lengths > 2).all()
    # the first rows' tokens are the training split's
    assert all((corpus.tokens(i) == train.tokens(i)).all() for i in range(len(train)))


def test_generic_csv_loader(tmp_path, capsys):
    rows = ["review,stars,shop"] + [f"text number {i},{'good' if i % 2 else 'bad'},{'a' if i < 30 else 'b'}"
                                    for i in range(60)]
    (tmp_path / "d.csv").write_text("\n".join(rows))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'out'}\ndata:\n  format: csv\n  root: {tmp_path}\n  path: d.csv\n"
                   "  domains: [a, b]\n  labels: [bad, good]\n  text_column: review\n  label_column: stars\n"
                   "  domain_column: shop\n")
    code, out, err = run_cli(capsys, "prepare", str(cfg))
    assert code == 0, err
    counts = json.loads((tmp_path / "out" / "splits.json").read_text())["counts"]
    assert counts["a"]["train"]["total"] + counts["a"]["dev"]["total"] + counts["a"]["test"]["total"] == 30
    # each row kept its own text, label and domain from the renamed columns
    from metakd_ray.data.split import read_split

    stored = [r for s in ("train", "dev", "test")
              for r in read_split(next((tmp_path / "out" / "cache").glob(f"data-*/{s}.arrow"))).table.to_pylist()]
    assert len(stored) == 60
    for r in stored:
        i = int(r["text"].rsplit(" ", 1)[1])
        assert (r["label"], r["domain"]) == (i % 2, "a" if i < 30 else "b")


def test_own_data_template_prepares_a_real_csv(tmp_path, capsys):
    """`cp own-data` writes the template with its comments; with its data keys pointed at a CSV of
    real reviews it prepares the splits."""
    import re

    target = tmp_path / "mine.yaml"
    assert run_cli(capsys, "presets")[1].count("\n") >= 4
    assert run_cli(capsys, "cp", "own-data", str(target))[0] == 0
    assert target.read_text().startswith("# own-data:")
    assert_one_error(*run_cli(capsys, "cp", "own-data", str(target))[::2], "exists", "--force")
    rows = ["text,label,domain"]
    for domain in ("books", "kitchen"):
        for label in ("positive", "negative"):
            reviews = (AMAZON / domain / f"{label}.review").read_text(encoding="utf-8", errors="replace")
            for text in re.findall(r"<review_text>\s*(.*?)\s*</review_text>", reviews, re.S)[:30]:
                rows.append(f'"{" ".join(text.split()).replace(chr(34), chr(39))}",{label},{domain}')
    (tmp_path / "my_reviews.csv").write_text("\n".join(rows), encoding="utf-8")
    code, out, err = run_cli(capsys, "prepare", str(target), f"data.root={tmp_path}", f"output_dir={tmp_path / 'out'}",
                             "model.teacher=minilm")
    assert code == 0, err
    counts = json.loads((tmp_path / "out" / "splits.json").read_text())["counts"]
    assert sum(counts["kitchen"][s]["total"] for s in ("train", "dev", "test")) == 60


def test_options_and_overrides_in_any_order():
    from metakd_ray.cli import parse

    args = parse(["sweep", "quickstart", "--space", "tune_spaces/distill.yaml", "--trials", "4", "output_dir=X"])
    assert args.overrides == ["output_dir=X"] and args.trials == 4
    args = parse(["run", "quickstart", "teacher.epochs=2", "--methods", "tinybert-meta,meta-kd", "seed=3"])
    assert args.overrides == ["teacher.epochs=2", "seed=3"] and args.methods == "tinybert-meta,meta-kd"
    from metakd_ray.pipeline import resolve_methods

    assert resolve_methods(args.methods, load_config("quickstart")) == ["tinybert_kd(meta)", "meta_kd"]


def test_validate_prints_resolved_config_with_overrides(capsys):
    code, out, _ = run_cli(capsys, "validate", "quickstart", "teacher.epochs=2", "distill.temperature=2")
    assert code == 0 and "epochs: 2.0" in out and "temperature: 2.0" in out
    cfg = load_config("quickstart", ["data.held_out_domain=dvd"])
    assert cfg.teacher_domains == ["books", "electronics", "kitchen"]


# --------------------------------------------------------------------------- bad config


@pytest.mark.parametrize("override, needles", [
    ("teacher.epoch=3", ["teacher.epoch", "unknown", "did you mean 'epochs'"]),
    ("data.domains=[books,kitchn]", ["data.domains", "kitchn", "did you mean 'kitchen'"]),
    ("distill.methods=[tinybert-mix,meta_kdd]", ["distill.methods", "meta_kdd", "did you mean 'meta_kd'"]),
    ("teacher.lr=fast", ["teacher.lr", "expected a number"]),
    ("teacher.domain_loss_weight=-0.5", ["teacher.domain_loss_weight", ">= 0"]),
    ("distill.domain_weight=-1", ["distill.domain_weight", ">= 0"]),
    ("model.student_layers=8", ["model.student_layers", "deeper than the teacher"]),
    ("model.layer_map=[2,4,6]", ["model.layer_map", "expected 2 entries"]),
    ("model.layer_map=[4,2]", ["model.layer_map", "increasing"]),
    ("model.student_init=general model.student_hidden=100", ["model.student_heads", "not divisible"]),
    ("model.student_hidden=128", ["model.student_hidden", "model.student_init: general"]),
    ("data.truncation=middle", ["data.truncation", "head_tail"]),
    ("model.pooling=max", ["model.pooling", "cls, mean"]),
    ("teacher.kind=multi", ["teacher.kind", "mtl"]),
    ("distill.term_scale=max", ["distill.term_scale", "target"]),
    ("general.lr=0", ["general.lr", "> 0"]),
    ("general.narrow_init=random", ["general.narrow_init", "teacher_layers, embeddings"]),
    ("distill.min_steps=-5", ["distill.min_steps", ">= 0"]),
    ("data.domains=[books,toys]", ["data.domains", "toys"]),
    ("data.held_out_domain=toys", ["data.held_out_domain"]),
    ("teacher.domain_loss=adversarial", ["teacher.domain_loss", "shuffled"]),
    ("teacher.batch_size=15", ["teacher.batch_size", "divisible"]),
    ("data.test_fraction=1.5", ["data.test_fraction"]),
    ("model.teacher=/no/such/model", ["model.teacher", "/no/such/model"]),
    ("model.student_init=./missing-student", ["model.student_init", "missing-student"]),
    ("distill.methods=[meta_kd,magic]", ["distill.methods", "magic"]),
    ("teacher=3", ["teacher", "expected a mapping"]),
    ("noequals", ["override", "key=value"]),
    ("data.format=xml", ["data.format", "expected one of", "amazon"]),
    ("data.domains=[]", ["data.domains", "at least one"]),
    ("data.domains=[books,books]", ["data.domains", "duplicate"]),
    ("data.labels=[negative,negative]", ["data.labels", "two distinct"]),
    ("data.max_length=1024", ["data.max_length", "512"]),
    ("distill.cache_teacher_targets=false", ["distill.cache_teacher_targets", "distill.teacher_signals"]),
    ("distill.teacher_signals=disk", ["distill.teacher_signals", "auto, cache, live"]),
    ("distill.cache_budget_gb=-1", ["distill.cache_budget_gb", ">= 0"]),
])
def test_bad_config_values(capsys, override, needles):
    code, _, err = run_cli(capsys, "validate", "quickstart", *override.split(" "))
    assert_one_error(code, err, *needles)


def test_bad_config_files(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    assert_one_error(*run_cli(capsys, "validate", str(bad))[::2], "bad.yaml", "YAML")
    assert_one_error(*run_cli(capsys, "validate", "no_such_preset")[::2], "no_such_preset", "quickstart")
    bad.write_text("- a\n- b\n")
    assert_one_error(*run_cli(capsys, "validate", str(bad))[::2], "mapping")


# --------------------------------------------------------------------------- bad data


def amazon_copy(tmp_path: Path, n: int = 20) -> Path:
    root = tmp_path / "amazon"
    for domain in ("books", "kitchen"):
        for label in ("positive", "negative"):
            slice_reviews(AMAZON / domain / f"{label}.review", root / domain / f"{label}.review", n)
    return root


def prepare_amazon(capsys, root: Path, out: Path, *extra):
    return run_cli(capsys, "prepare", "quickstart", f"data.root={root}", "data.path=", f"output_dir={out}",
                   "data.domains=[books,kitchen]", "data.max_length=32", *extra)


@pytest.fixture
def prepared_out(tmp_path, capsys):
    """An output directory holding a finished prepare, to check that failures never overwrite it."""
    root = amazon_copy(tmp_path)
    out = tmp_path / "out"
    code, _, err = prepare_amazon(capsys, root, out)
    assert code == 0, err
    return root, out, (out / "splits.json").read_bytes()


def _corrupt_and_check(capsys, root, out, before, needles, *extra):
    code, _, err = prepare_amazon(capsys, root, out, *extra)
    assert_one_error(code, err, *needles)
    assert (out / "splits.json").read_bytes() == before


def test_truncated_review_file(prepared_out, capsys):
    root, out, before = prepared_out
    f = root / "books" / "positive.review"
    f.write_text(f.read_text()[:-400])
    _corrupt_and_check(capsys, root, out, before, ["positive.review", "truncated"])


def test_review_without_text(prepared_out, capsys):
    root, out, before = prepared_out
    f = root / "kitchen" / "negative.review"
    text = f.read_text()
    start, end = text.index("<review_text>"), text.index("</review_text>")
    f.write_text(text[:start] + "<review_text>\n  \n" + text[end:])
    _corrupt_and_check(capsys, root, out, before, ["negative.review", "review 1", "no <review_text>"])


def test_non_utf8_review_file(prepared_out, capsys):
    root, out, before = prepared_out
    f = root / "books" / "negative.review"
    f.write_bytes(f.read_bytes()[:100] + b"\xff\xfe" + f.read_bytes()[100:])
    _corrupt_and_check(capsys, root, out, before, ["negative.review", "UTF-8", "byte 100"])


def test_empty_domain_file(prepared_out, capsys):
    root, out, before = prepared_out
    (root / "kitchen" / "positive.review").write_text("")
    _corrupt_and_check(capsys, root, out, before, ["kitchen/positive.review", "no <review> blocks"])


def test_missing_domain_directory(prepared_out, capsys):
    root, out, before = prepared_out
    shutil.rmtree(root / "kitchen")
    _corrupt_and_check(capsys, root, out, before, ["kitchen", "no directory"])


def test_missing_data_root(tmp_path, capsys):
    code, _, err = prepare_amazon(capsys, tmp_path / "nowhere", tmp_path / "out")
    assert_one_error(code, err, "nowhere", "METAKD_DATA_ROOT")


def test_too_few_examples(tmp_path, capsys):
    root = amazon_copy(tmp_path, n=3)
    code, _, err = prepare_amazon(capsys, root, tmp_path / "out")
    assert_one_error(code, err, "books", "at least 10")


def _table_config(tmp_path, fmt, path, **extra):
    lines = [f"output_dir: {tmp_path / 'out'}", "data:", f"  format: {fmt}", f"  root: {tmp_path}",
             f"  path: {path}", "  domains: [a, b]", "  labels: [bad, good]"]
    lines += [f"  {k}: {v}" for k, v in extra.items()]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    return str(cfg)


def test_label_outside_label_set(tmp_path, capsys):
    rows = ["text,label,domain"] + [f"t{i},{'good' if i % 2 else 'bad'},{'a' if i < 20 else 'b'}" for i in range(40)]
    rows[7] = "t7,excellent,a"
    (tmp_path / "d.csv").write_text("\n".join(rows))
    code, _, err = run_cli(capsys, "prepare", _table_config(tmp_path, "csv", "d.csv"))
    assert_one_error(code, err, "d.csv row 7", "'excellent'", "label set")


def test_missing_column(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": f"t{i}", "label": "good", "domain": "a"})
                                                for i in range(20)))
    code, _, err = run_cli(capsys, "prepare", _table_config(tmp_path, "jsonl", "d.jsonl"))
    assert_one_error(code, err, "d.jsonl", "missing column", "'text'")


def test_unknown_domain_in_table(tmp_path, capsys):
    rows = ["text,label,domain"] + [f"t{i},good,a" for i in range(20)]
    (tmp_path / "d.csv").write_text("\n".join(rows))
    code, _, err = run_cli(capsys, "prepare", _table_config(tmp_path, "csv", "d.csv"))
    assert_one_error(code, err, "domain 'b'", "no rows")


def test_malformed_parquet(tmp_path, capsys):
    (tmp_path / "d.parquet").write_bytes(b"this is not parquet")
    code, _, err = run_cli(capsys, "prepare", _table_config(tmp_path, "parquet", "d.parquet"))
    assert_one_error(code, err, "d.parquet", "cannot be read as parquet")


def test_mnli_tsv_bad_row_and_missing_column(tmp_path, capsys):
    d = tmp_path / "mnli"
    d.mkdir()
    lines = (MNLI / "mnli_val.tsv").read_text().splitlines()[:200]
    lines[5] = lines[5].rsplit("\t", 1)[0]  # drop the genre field
    (d / "val.tsv").write_text("\n".join(lines))
    args = ["prepare", "mnli", f"data.root={tmp_path}", "data.path=mnli", f"output_dir={tmp_path / 'out'}"]
    code, _, err = run_cli(capsys, *args)
    assert_one_error(code, err, "val.tsv line 6", "expected 4")
    (d / "val.tsv").write_text("premise\thypothesis\tlabel\tgenre\n")
    code, _, err = run_cli(capsys, *args)
    assert_one_error(code, err, "val.tsv", "missing column")


def test_missing_model_path_for_prepare(tmp_path, capsys):
    root = amazon_copy(tmp_path)
    code, _, err = prepare_amazon(capsys, root, tmp_path / "out", f"model.teacher={tmp_path / 'no-model'}")
    assert_one_error(code, err, "model.teacher", "no-model")


def test_cli_exit_code_through_console_script(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "metakd_ray.cli", "validate", "quickstart", "teacher.lr=-1"],
                          capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: config key 'teacher.lr': expected a value > 0, got -1.0"


# --------------------------------------------------------------------------- data.unlabelled_path


def _reviews_config(tmp_path, tiny_amazon, unlabelled: str, **distill) -> str:
    lines = [f"output_dir: {tmp_path / 'out'}", "data:", f"  root: {tmp_path}", f"  path: {tiny_amazon}",
             "  domains: [books, kitchen]", "  max_length: 32", "  max_train_per_domain: 40",
             f"  unlabelled_path: '{unlabelled}'"]
    lines += ["distill:"] + [f"  {k}: {v}" for k, v in distill.items()] if distill else []
    cfg = tmp_path / "c.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    return str(cfg)


def _real_texts(domain: str, n: int, start: int = 0) -> list[str]:
    from metakd_ray.data.amazon import parse_review_file

    return parse_review_file(AMAZON / domain / "positive.review")[start:start + n]


@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl", "parquet"])
def test_unlabelled_path_reads_each_format_into_the_transfer_set(tmp_path, capsys, tiny_amazon, fmt):
    """Real reviews the labelled slice does not hold (reviews 100+ of each file) as the transfer set:
    one Arrow file per domain, labels -1, every row tokenized; splits.json counts them."""
    import pandas as pd

    from metakd_ray.data.prepare import prepare

    texts = {"books": _real_texts("books", 30, 100), "kitchen": _real_texts("kitchen", 20, 100)}
    frame = pd.DataFrame([{"text": t, "domain": d} for d, ts in texts.items() for t in ts])
    if fmt == "txt":  # a directory of <domain>.txt, one text per line
        target = tmp_path / "more"
        target.mkdir()
        for d, ts in texts.items():
            (target / f"{d}.txt").write_text("\n".join(t.replace("\n", " ") for t in ts) + "\n\n")
    else:
        target = tmp_path / f"more.{fmt}"
        {"csv": lambda: frame.to_csv(target, index=False),
         "jsonl": lambda: frame.to_json(target, orient="records", lines=True),
         "parquet": lambda: frame.to_parquet(target)}[fmt]()
    config = _reviews_config(tmp_path, tiny_amazon, target.name)
    code, out, err = run_cli(capsys, "prepare", config)
    assert code == 0, err
    counts = json.loads((tmp_path / "out" / "splits.json").read_text())["counts"]
    assert counts["books"]["unlabelled"]["total"] == 30 and counts["kitchen"]["unlabelled"]["total"] == 20
    assert "transfer set from" in out
    data = prepare(load_config(config), quiet=True)
    books = data.transfer["books"]
    assert (books.labels == -1).all() and (books.domain_ids == data.domain_id("books")).all()
    assert (books.lengths > 2).all() and books.lengths.max() <= 32
    written = [t.replace("\n", " ") if fmt == "txt" else t for t in texts["books"]]
    assert set(books.table.column("text").to_pylist()) == {t.strip() for t in written}


def test_unlabelled_path_leaves_out_dev_and_test_texts_and_joins_the_training_remainder(tmp_path, tiny_amazon):
    from metakd_ray.data.prepare import prepare

    data = prepare(load_config(_reviews_config(tmp_path, tiny_amazon, "")), quiet=True)
    dev_text = data.splits["dev"].for_domains([0]).table.column("text").to_pylist()[:3]
    rows = [{"text": t, "domain": "books"} for t in dev_text + _real_texts("books", 5, 100)]
    (tmp_path / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(_reviews_config(tmp_path, tiny_amazon, "more.jsonl", unlabelled_per_domain=4))
    data = prepare(cfg, quiet=True)
    texts = data.transfer["books"].table.column("text").to_pylist()
    assert len(texts) == 4 + 5 and not set(dev_text) & set(texts)  # 4 of the training remainder, then the file's 5
    assert len(data.transfer["kitchen"]) == 4 and data.transfer_key


@pytest.mark.parametrize("name, content, needles", [
    ("more.jsonl", '{"text": "fine", "domain": "books"}\n{"text": "broken\n', ["more.jsonl line 2", "not valid JSON"]),
    ("more.jsonl", '{"text": "fine", "domain": "books"}\n{"text": "", "domain": "books"}\n',
     ["more.jsonl line 2", "empty"]),
    ("more.csv", "text,domain\nfine,books\nalso fine,garden\n", ["more.csv line 3", "'garden'", "data.domains"]),
    ("more.csv", "body,domain\nfine,books\n", ["more.csv", "missing column", "'text'"]),
    ("more.parquet", None, ["more.parquet", "cannot be read as parquet"]),
    ("more.xml", "<a/>", ["more.xml", "unknown type"]),
    ("missing.jsonl", "", ["missing.jsonl", "not found"]),
])
def test_bad_unlabelled_rows_are_one_error_line(tmp_path, capsys, tiny_amazon, name, content, needles):
    if content is not None and name != "missing.jsonl":
        (tmp_path / name).write_text(content)
    elif name.endswith(".parquet"):
        (tmp_path / name).write_bytes(b"not parquet at all")
    code, _, err = run_cli(capsys, "prepare", _reviews_config(tmp_path, tiny_amazon, name))
    assert_one_error(code, err, *needles)


# --------------------------------------------------------------------------- more bad input, each one error line


def _reviews(tmp_path, fmt: str, body: str) -> str:
    (tmp_path / f"d.{fmt}").write_text(body)
    return _table_config(tmp_path, fmt, f"d.{fmt}")


def test_malformed_jsonl_line_and_empty_csv_text(tmp_path, capsys):
    good = [json.dumps({"text": f"t{i}", "label": "good", "domain": "a" if i < 20 else "b"}) for i in range(40)]
    code, _, err = run_cli(capsys, "prepare", _reviews(tmp_path, "jsonl", "\n".join(good[:7] + ['{"text": "t7",'] + good[8:])))
    assert_one_error(code, err, "d.jsonl", "jsonl")
    rows = ["text,label,domain"] + [f"t{i},good,{'a' if i < 20 else 'b'}" for i in range(40)]
    rows[4] = ",good,a"
    code, _, err = run_cli(capsys, "prepare", _reviews(tmp_path, "csv", "\n".join(rows)))
    assert_one_error(code, err, "d.csv row 4", "empty")


def test_mnli_label_outside_the_set(tmp_path, capsys):
    d = tmp_path / "mnli"
    d.mkdir()
    lines = (MNLI / "mnli_val.tsv").read_text().splitlines()[:200]
    fields = lines[9].split("\t")
    lines[9] = "\t".join(fields[:2] + ["maybe"] + fields[3:])
    (d / "val.tsv").write_text("\n".join(lines))
    code, _, err = run_cli(capsys, "prepare", "mnli", f"data.root={tmp_path}", "data.path=mnli",
                           f"output_dir={tmp_path / 'out'}")
    assert_one_error(code, err, "val.tsv line 10", "'maybe'", "label set")


def test_predict_and_export_refuse_what_is_not_a_model_or_a_text_file(tmp_path, capsys):
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("hello")
    for args in (["predict", str(tmp_path / "not-a-model"), "some text"], ["export", str(tmp_path / "not-a-model")]):
        code, _, err = run_cli(capsys, *args)
        assert_one_error(code, err, "not-a-model")
    model = tmp_path / "model"
    from metakd_ray.config import model_path
    from metakd_ray.models import build_student, save_model

    save_model(build_student("minilm", "", 1, 384, ["negative", "positive"], ["books"]), model, {"kind": "student"},
               tokenizer_from=model_path("minilm"), max_length=32)
    code, _, err = run_cli(capsys, "predict", str(model), "--file", str(tmp_path / "missing.txt"))
    assert_one_error(code, err, "missing.txt", "no such file")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    code, _, err = run_cli(capsys, "predict", str(model), "--file", str(tmp_path / "broken.jsonl"))
    assert_one_error(code, err, "broken.jsonl", "cannot read it as jsonl")
    code, _, err = run_cli(capsys, "predict", str(model), "--file", str(tmp_path / "notes.csv"))
    assert_one_error(code, err, "notes.csv", "no such file")


def test_sweep_bad_trials_resume_reuse_and_a_damaged_study(tmp_path, capsys, tiny_config):
    space = str(REPO / "tune_spaces" / "distill.yaml")
    config = str(tiny_config())
    code, _, err = run_cli(capsys, "sweep", config, "--space", space, "--trials", "0")
    assert_one_error(code, err, "--trials")
    code, _, err = run_cli(capsys, "sweep", config, "--space", space, "--name", "none", "--resume")
    assert_one_error(code, err, "--resume", "no restorable sweep")
    from metakd_ray.config import load_config

    sweep = load_config(config).out / "sweeps" / "taken"
    sweep.mkdir(parents=True)
    code, _, err = run_cli(capsys, "sweep", config, "--space", space, "--name", "taken")
    assert_one_error(code, err, "already exists", "--resume", "--name")
    (sweep / "tune" / "tuner").mkdir(parents=True)
    (sweep / "tune" / "tuner" / "tuner.pkl").write_bytes(b"")  # restorable as far as Tune's check goes
    (sweep / "optuna.db").write_bytes(b"this is not a sqlite file" * 100)
    before = (sweep / "optuna.db").read_bytes()
    code, _, err = run_cli(capsys, "sweep", config, "--space", space, "--name", "taken", "--resume")
    assert_one_error(code, err, "optuna.db", "cannot be opened")
    assert (sweep / "optuna.db").read_bytes() == before  # nothing overwritten


def test_a_damaged_mlflow_store_is_one_line_and_left_as_it_is(tmp_path, capsys, tiny_config):
    from metakd_ray.config import load_config

    config = str(tiny_config())
    store = load_config(config).out / "mlflow.db"
    store.parent.mkdir(parents=True)
    store.write_bytes(b"not an MLflow store " * 500)
    code, _, err = run_cli(capsys, "run", config)
    assert_one_error(code, err, "mlflow.db", "cannot be opened", "move it aside")
    assert store.read_bytes() == b"not an MLflow store " * 500
