"""What the terminal shows.

By default workers' own output is not streamed to the driver (``log_to_driver``): Ray's, Ray
Train's and MLflow's bookkeeping lines (worker groups, every report and checkpoint, actor
warnings from Ray's C++ core) would bury the pipeline's progress. What the user should see is
sent to a ``Console`` actor and printed by the driver. ``--verbose`` streams everything as well.

Imports neither torch nor Ray at module level, so the command line can set the quiet environment
(and the heap's policy, ``bound_heap``) before anything that reads it is imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys


class Console:
    """Lines and student step counts sent by workers and tasks, for the driver to print (a Ray
    actor that holds no CPU)."""

    def __init__(self):
        self.lines: list[str] = []
        self.steps: dict[str, tuple[int, int]] = {}

    def say(self, line: str) -> None:
        self.lines.append(line)

    def update(self, name: str, step: int, total: int) -> None:
        self.steps[name] = (step, total)

    def drain(self) -> tuple[list[str], dict[str, tuple[int, int]]]:
        lines, self.lines = self.lines, []
        return lines, dict(self.steps)


def start_console():
    """A ``Console`` on the driver's own node: a worker node can be lost mid-run (the teacher then
    resumes from its checkpoint), and the lines saying so must not be lost with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(Console).options(scheduling_strategy=here).remote()


@contextlib.contextmanager
def relayed_console(every: float = 2.0):
    """A ``Console`` whose lines the driver prints from a background thread while the block runs
    (e.g. a blocking ``TorchTrainer.fit``); yields the actor handle to pass to the workers."""
    import threading

    import ray

    console = start_console()
    stop = threading.Event()

    def relay():
        while True:
            finished = stop.wait(every)
            for line in ray.get(console.drain.remote())[0]:
                print(line, flush=True)
            if finished:
                return

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    try:
        yield console
    finally:
        stop.set()
        thread.join()
        ray.kill(console)


def say_to(console):
    """``print`` for a worker: to the driver through ``console`` when there is one."""
    if console is None:
        return lambda line: print(line, flush=True)
    return lambda line: console.say.remote(line)


def verbose() -> bool:
    """``metakd-ray --verbose``: Ray's and MLflow's own INFO lines are shown too."""
    return os.environ.get("METAKD_VERBOSE") == "1"


def worker_env() -> dict[str, str]:
    """Environment of the workers and tasks of a local Ray (a cluster's job brings its own): no
    download or upload progress bars; print() in a Ray Train worker printed once (Ray's print
    patch would also echo it through its logger); MLflow's INFO lines only when verbose."""
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if verbose():
        env["METAKD_VERBOSE"] = "1"
    else:
        env["MLFLOW_LOGGING_LEVEL"] = "WARNING"
    return env


def bound_heap() -> None:
    """Make the driver give back the memory it frees. glibc raises its mmap threshold after the first
    large frees, so later batches' buffers come from the heap, which cannot shrink while small live
    objects sit between them: the driver's peak RSS then grows with the data it embeds and sends. A
    fixed trim threshold keeps the 128 KB mmap threshold. Workers keep glibc's default: mapping every
    large buffer afresh slows their training steps by a fifth or more."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD


def quiet_environment() -> None:
    """Give this process (the driver) the workers' quiet environment, where the user has not set a
    key: transformers, huggingface_hub and MLflow read it when they are imported, so call this first."""
    for key, value in worker_env().items():
        os.environ.setdefault(key, value)
