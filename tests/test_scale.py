"""Cost that stays linear in the data and memory that stays bounded per process: what a task is
handed, the teacher-signal plan, bounded evaluation, and a teacher pass whose memory does not grow
with its rows."""

import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from metakd_ray.config import load_config
from metakd_ray.data.prepare import eval_sample, prepare
from metakd_ray.distill import domain_data
from metakd_ray.prototypes import compute_prototype_scores
from metakd_ray.signals import PassSize, plan
from metakd_ray.training import BestStates


@pytest.fixture
def prepared(tiny_config):
    cfg = load_config(str(tiny_config(distill={"unlabelled_per_domain": 8})))
    data = prepare(cfg, quiet=True)
    return cfg, data, compute_prototype_scores(cfg, data, quiet=True)


def test_a_domains_tasks_are_handed_its_rows_only(prepared):
    """What Ray sends a student or teacher-pass task (the pickled ``DomainData``) holds that domain's
    rows of every split and nothing of the other domain's, in a fraction of the whole data's bytes."""
    cfg, data, scores = prepared
    books = data.domain_id("books")
    sent = pickle.dumps(domain_data(cfg, data, "books", scores), protocol=5)
    got = pickle.loads(sent)
    counts = {s: int((data.splits[s].domain_ids == books).sum()) for s in ("train", "dev", "test")}
    assert (len(got.train), len(got.dev), len(got.test), len(got.transfer)) == (counts["train"], counts["dev"],
                                                                                counts["test"], 8)
    for split in (got.train, got.dev, got.test, got.transfer):
        assert set(split.domain_ids.tolist()) == {books}
    assert "text" not in got.train.table.column_names  # the tokens travel, not the raw text
    assert np.allclose(got.t, scores[data.splits["train"].domain_ids == books])
    whole = sum(len(pickle.dumps(s, protocol=5)) for s in [*data.splits.values(), *data.transfer.values()])
    assert len(sent) < 0.7 * whole  # one domain of two (a schema per split besides)
    # its rows read back exactly
    b = got.train.batch([0, 1])
    ref = data.splits["train"].for_domains([books]).batch([0, 1])
    assert all(torch.equal(b[k], ref[k]) for k in b)


def test_auto_caches_hidden_states_only_when_read_more_than_once_and_within_budget(tiny_config):
    cfg = load_config(str(tiny_config()))  # teacher 2 layers x 384, student 1 layer: 3 stored layers
    per_text = 3 * 384 * 2 * 100  # bytes of a 100-token text's cache
    once = {("meta", "books"): PassSize(1000, 100_000, 1000)}
    twice = {("meta", "books"): PassSize(1000, 100_000, 2000), ("single-kitchen", "books"): PassSize(1000, 100_000, 0)}
    assert not plan(cfg, once).internals and "read at most once" in plan(cfg, once).line
    chosen = plan(cfg, twice)
    assert chosen.internals and "auto -> cache" in chosen.line and "2.00 times" in chosen.line
    assert f"{1000 * per_text / 1e9:.2f} GB" in chosen.line  # the soft-label-only pass is not counted
    assert plan(cfg, once, trials=4).internals  # every sweep trial reads the same passes
    cfg.distill.cache_budget_gb = 1000 * per_text / 2e9
    assert not plan(cfg, twice).internals and "over distill.cache_budget_gb" in plan(cfg, twice).line
    cfg.distill.cache_budget_gb = 2.0
    cfg.distill.gpus_per_task = 0.5
    assert not plan(cfg, twice).internals and "GPU" in plan(cfg, twice).line
    cfg.distill.teacher_signals = "cache"
    assert plan(cfg, once).internals
    cfg.distill.teacher_signals = "live"
    assert not plan(cfg, twice).internals
    assert not plan(cfg, {("meta", "books"): PassSize(1000, 100_000, 0)}).internals  # no stage 1 at all


def test_evaluation_scores_a_fixed_bounded_sample_and_the_whole_set_chooses(prepared):
    cfg, data, _ = prepared
    dev = data.splits["dev"]
    sample = eval_sample(dev, 5, seed=1)
    assert np.bincount(sample.domain_ids).tolist() == [5, 5]
    assert (sample.table.column("uid").to_pylist() == eval_sample(dev, 5, seed=1).table.column("uid").to_pylist())
    assert eval_sample(dev, 0, 1) is dev and eval_sample(dev, 1000, 1) is dev

    model = torch.nn.Linear(2, 1)
    kept = BestStates(2)
    for step, (score, weight) in enumerate([(0.5, 1.0), (0.7, 2.0), (0.6, 3.0), (0.6, 4.0)], start=1):
        torch.nn.init.constant_(model.weight, weight)
        kept.offer(score, model, step)
    assert [(s, step) for s, step, _ in kept.kept] == [(0.7, 2), (0.6, 3)]  # a tie with the worst kept (step 4) keeps the earlier
    assert kept.choose(model) == (2, 0.7) and model.weight[0, 0] == 2.0
    # the whole dev set prefers the state the sample ranked second
    assert kept.choose(model, rescore=lambda: float(model.weight[0, 0] == 3.0)) == (3, 1.0)
    assert model.weight[0, 0] == 3.0


def _pass_peak(config: str, rows: int, queue) -> None:
    """Run a teacher pass with hidden states over ``rows`` texts in this fresh process; report VmHWM."""
    torch.set_num_threads(1)
    from metakd_ray.models import build_teacher
    from metakd_ray.signals import teacher_pass

    cfg = load_config(config)
    data = prepare(cfg, quiet=True)
    train = data.splits["train"]
    rows_ = train.take(np.arange(rows) % len(train))
    teacher = build_teacher(cfg.model.teacher, data.labels, data.domains)
    teacher_pass(cfg, rows_, np.ones(rows, np.float32), teacher, True, Path(cfg.output_dir) / f"pass-{rows}")
    status = Path("/proc/self/status").read_text()
    queue.put(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024)


def test_a_teacher_pass_over_four_times_the_rows_needs_no_more_memory(tiny_config, monkeypatch):
    """The pass writes each batch as it goes: 4x the rows write 4x the bytes (here about 260 MB more
    than 1x) while the process's peak memory stays within 40 MB. glibc's heap gets a fixed mmap
    threshold in the measured process, so that its fragmentation (a plateau of ~90 MB after a few
    hundred batches) does not blur what the code itself holds."""
    config = str(tiny_config(data={"max_length": 64}))
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    ctx = multiprocessing.get_context("spawn")
    peaks = {}
    for rows in (600, 2400):
        queue = ctx.Queue()
        proc = ctx.Process(target=_pass_peak, args=(config, rows, queue))
        proc.start()
        peaks[rows] = queue.get(timeout=600)
        proc.join()
    out = Path(load_config(config).output_dir)
    written = {rows: (out / f"pass-{rows}" / "hidden.npy").stat().st_size for rows in peaks}
    assert written[2400] > 3.5 * written[600] and written[2400] - written[600] > 150e6
    assert peaks[2400] - peaks[600] < 40e6, peaks
