"""The command line as the README shows it: every documented option exists, the config reference is
current, `data fetch` downloads and checks (from files served on 127.0.0.1), `clean` keeps results."""

import functools
import http.server
import json
import re
import shlex
import tarfile
import threading

import pytest

from conftest import AMAZON, MNLI, REPO
from metakd_ray.cli import _parser, main, parse


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _readme_command_lines() -> list[list[str]]:
    """Every `metakd-ray ...` command line of README.md: in its shell code blocks, in its commands
    table and in its prose."""
    text = (REPO / "README.md").read_text()
    lines, language = [], None
    for line in text.replace("\\\n", " ").splitlines():
        if line.startswith("```"):
            language = None if language is not None else (line[3:] or "bash")
        elif language == "bash" and "metakd-ray " in line:
            for part in re.split(r"&&|\|\|", line.split(" #")[0]):
                if "metakd-ray " in part:
                    lines.append(part[part.index("metakd-ray ") + len("metakd-ray "):])
    lines += re.findall(r"`metakd-ray ([^`]*)`", text)
    return [shlex.split(line.replace("\\|", "|").replace("[", " ").replace("]", " ")) for line in lines]


def test_every_option_the_readme_names_exists():
    _, commands = _parser()
    seen = set()
    lines = _readme_command_lines()
    assert len(lines) > 15
    for words in lines:
        command = next((w for w in words if w in commands), None)
        if command is None:  # `metakd-ray --version`, `--help`
            assert all(w in ("--version", "--help", "-v") for w in words if w.startswith("-")), words
            continue
        seen.add(command)
        help_text = commands[command].format_help()
        for word in words:
            for option in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", word):
                assert option in help_text, f"README: `metakd-ray {' '.join(words)}` names {option}, " \
                                             f"which `metakd-ray {command} --help` does not have"
    assert seen == set(commands)  # and every command is in the README


def test_configuration_reference_is_current():
    from metakd_ray.config_reference import DOC, reference, undocumented

    assert undocumented() == []
    assert DOC.read_text() == reference(), "run .venv/bin/python -m metakd_ray.config_reference"


def test_version_verbose_anywhere_and_export_defaults_to_onnx(capsys):
    from metakd_ray import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"metakd-ray {__version__}"
    assert parse(["-v", "validate", "quickstart"]).verbose and parse(["validate", "quickstart", "-v"]).verbose
    assert not parse(["validate", "quickstart"]).verbose
    args = parse(["export", "some/model", "--int8"])
    assert args.command == "export" and args.int8
    code, _, err = run_cli(capsys, "export", "no/such/model")
    assert code == 2 and err.startswith("error: ") and "no/such/model" in err


def test_a_missing_data_set_names_the_fetch_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("METAKD_DATA_ROOT", str(tmp_path / "empty"))
    code, _, err = run_cli(capsys, "prepare", "quickstart", f"output_dir={tmp_path / 'out'}")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "metakd-ray data fetch amazon" in err and str(tmp_path / "empty") in err


# --------------------------------------------------------------------------- data fetch


@pytest.fixture
def served(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path / "www"``; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # its access log would land in the CLI's captured stderr
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _blitzer_archive(path, skip: str = ""):
    """The authors' archive layout (sorted_data_acl/<domain>/...) around the real review files."""
    from metakd_ray.fetch import AMAZON_DIRS

    with tarfile.open(path, "w:gz") as tar:
        for domain, original in AMAZON_DIRS.items():
            for label in ("positive", "negative"):
                if f"{domain}/{label}" != skip:
                    tar.add(AMAZON / domain / f"{label}.review", f"sorted_data_acl/{original}/{label}.review")


def test_fetch_amazon_over_http_checks_the_files_and_the_quickstart_finds_them(tmp_path, capsys, served):
    www, url = served
    _blitzer_archive(www / "domain_sentiment_data.tar.gz")
    code, out, err = run_cli(capsys, "data", "fetch", "amazon", "--to", str(tmp_path / "data"),
                             "--url", f"{url}/domain_sentiment_data.tar.gz")
    assert code == 0, err
    fetched = tmp_path / "data" / "amazon-blitzer2007"
    for domain in ("books", "dvd", "electronics", "kitchen"):
        for label in ("positive", "negative"):
            assert (fetched / domain / f"{label}.review").read_bytes() == (AMAZON / domain / f"{label}.review").read_bytes()
    assert out.count("1000 reviews") == 8 and out.count("the copy the committed results used") == 8
    code, out, err = run_cli(capsys, "validate", "quickstart", f"data.root={tmp_path / 'data'}")
    assert code == 0, err

    # a broken source: one error line, and the copy already there is untouched
    _blitzer_archive(www / "partial.tar.gz", skip="dvd/negative")
    for source in (f"{url}/partial.tar.gz", f"{url}/missing.tar.gz", str(tmp_path / "nothing-here.tar.gz")):
        code, _, err = run_cli(capsys, "data", "fetch", "amazon", "--to", str(tmp_path / "data"), "--url", source)
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: data fetch"), err
    assert (fetched / "dvd" / "negative.review").is_file()


def test_fetch_mnli_writes_what_the_mnli_loader_reads(tmp_path, capsys, monkeypatch):
    import csv

    source = tmp_path / "multi_nli"
    source.mkdir()
    labels = {"entailment": 0, "neutral": 1, "contradiction": 2}
    for split, name in (("train", "mnli_train.tsv"), ("validation_matched", "mnli_val.tsv")):
        with open(MNLI / name, encoding="utf-8") as fh, open(source / f"{split}.jsonl", "w") as out:
            for i, row in enumerate(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)):
                if i == 600:
                    break
                out.write(json.dumps({"premise": row["sentence1"], "hypothesis": row["sentence2"],
                                      "label": labels[row["label"]], "genre": row["genre"]}) + "\n")
            out.write(json.dumps({"premise": "no gold", "hypothesis": "label", "label": -1, "genre": "slate"}) + "\n")
    code, out, err = run_cli(capsys, "data", "fetch", "mnli", "--to", str(tmp_path / "data"), "--url", str(source))
    assert code == 0, err
    assert "train.tsv: 600 labelled pairs" in out
    monkeypatch.setenv("METAKD_DATA_ROOT", str(tmp_path / "data"))
    code, out, err = run_cli(capsys, "prepare", "mnli", "data.path=multinli", f"output_dir={tmp_path / 'out'}")
    assert code == 0, err
    counts = json.loads((tmp_path / "out" / "splits.json").read_text())["counts"]
    assert sum(c[s]["total"] for c in counts.values() for s in ("train", "dev", "test")) == 1200


# --------------------------------------------------------------------------- clean


def test_clean_lists_and_deletes_derived_caches_only(tiny_config, capsys):
    from metakd_ray.config import load_config

    config = str(tiny_config())
    assert main(["prepare", config]) == 0
    out = load_config(config).out
    model = out / "students" / "meta_kd" / "books" / "model" / "model.safetensors"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"\0" * 4096)
    (out / "results.json").write_text("{}")
    capsys.readouterr()
    code, listing, _ = run_cli(capsys, "clean", str(out), "--dry-run")
    assert code == 0 and "cache" in listing and "students" not in listing and "would free" in listing
    assert (out / "cache").is_dir()
    code, listing, _ = run_cli(capsys, "clean", str(out))
    assert code == 0 and not (out / "cache").exists() and model.is_file() and (out / "results.json").is_file()
    code, listing, _ = run_cli(capsys, "clean", str(out), "--models")
    assert code == 0 and not (out / "students").exists() and (out / "results.json").is_file()
    code, _, err = run_cli(capsys, "clean", str(out / "students"))
    assert code == 2 and "not a metakd-ray output directory" in err
