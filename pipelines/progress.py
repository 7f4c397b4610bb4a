"""What `regmix run` shows while kfp.local runs: a line per stage with its state and time, a bar
per fan-out (done / total, failed, reused, ETA), the best proxy so far.

Two sources, both this run's own: kfp.local's log lines (a task starts, a task finishes) and the
outputs its tasks write under the pipeline root (a plan's list of mixtures, each fan-out
iteration's results). On a terminal it is a rich live view; elsewhere (a file, a pipe, CI) one
plain line per finished stage.
"""

import json
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from regmix.config.sections import target_loss

# What each plan's fan-out trains, in words (any other plan is named as KFP names it)
FAN_OUT_NOUNS = {"sample-mixtures-op": "proxies", "propose-proxies-op": "active-learning proxies",
                 "plan-gate-op": "gate proxies", "plan-large-op": "larger runs",
                 "plan-rank-check-op": "rank-check runs"}
# Fan-outs whose proxies the regression is fitted on: the best proxy is the best of these
TRAINING_PLANS = ("sample-mixtures-op", "propose-proxies-op")

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # kfp.local colours task names
STARTED = re.compile(r"Executing task '([^']+)'")
FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")


def fan_outs(pipeline_spec) -> dict[str, tuple[str, str]]:
    """Each ParallelFor's training task -> (its loop's name, the plan task whose output it
    iterates over), read from the compiled pipeline (KFP names the tasks: train-proxy-op-2...)."""
    found = {}
    for component in pipeline_spec.components.values():
        for loop, task in component.dag.tasks.items():
            if task.HasField("parameter_iterator"):
                channel = task.parameter_iterator.items.input_parameter
                plan = channel.removeprefix("pipelinechannel--").removesuffix("-Output")
                (train,) = pipeline_spec.components[f"comp-{loop}"].dag.tasks
                found[train] = (loop, plan)
    return found


def read_output(path: Path):
    """A task's `Output` parameter, or None while it is missing or half written."""
    try:
        return json.loads(path.read_text())["parameterValues"]["Output"]
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class Stage:
    name: str
    started: float
    ended: float | None = None
    failed: bool = False
    # A fan-out's counts, in mixtures (a proxy task trains several)
    plan: str | None = None
    total: int | None = None
    done: int = 0
    errors: int = 0
    reused: int = 0

    @property
    def label(self) -> str:
        return FAN_OUT_NOUNS.get(self.plan, self.name.removesuffix("-op"))

    def seconds(self, now: float) -> float:
        return (self.ended or now) - self.started

    def eta(self, now: float) -> float | None:
        """From the finished ones: the time they took per mixture, times those left."""
        if self.total and 0 < self.done < self.total:
            return self.seconds(now) / self.done * (self.total - self.done)
        return None

    def counts(self) -> str:
        return f"{self.done}/{self.total or '?'} done, {self.errors} failed, {self.reused} reused"


@dataclass
class RunView:
    """The run's state, fed by kfp.local's log lines and polled task outputs (thread-safe)."""

    pipeline_root: Path
    fan_out: dict[str, tuple[str, str]]
    target: dict[str, float] | str
    stages: dict[str, Stage] = field(default_factory=dict)
    best: tuple[str, float] | None = None
    run_dir: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_line(self, line: str) -> None:
        line = ANSI.sub("", line)
        now = time.monotonic()
        with self.lock:
            if self.run_dir is None and (found := re.search(
                    rf"{re.escape(str(self.pipeline_root))}/([^/\"]+)/", line)):
                self.run_dir = self.pipeline_root / found[1]
            if match := STARTED.search(line):
                name = match[1]
                if name not in self.stages:
                    plan = self.fan_out.get(name, (None, None))[1]
                    self.stages[name] = Stage(name, now, plan=plan)
            elif match := FINISHED.search(line):
                stage = self.stages.get(match[1])
                if stage is not None:
                    stage.failed |= match[2] != "SUCCESS"
                    if stage.plan is None or stage.failed:  # a fan-out ends with its last one
                        stage.ended = now

    def poll(self) -> None:
        """Count each fan-out's finished mixtures from the outputs its iterations wrote."""
        if self.run_dir is None:
            return
        with self.lock:
            fan_outs = [s for s in self.stages.values() if s.plan and s.ended is None]
        for stage in fan_outs:
            loop, plan = self.fan_out[stage.name]
            planned = next((read_output(p) for p in self.run_dir.glob(
                f"**/{plan}/executor_output.json")), None)
            results = [r for path in self.run_dir.glob(
                f"**/{loop}-iteration-*/{stage.name}/executor_output.json")
                if (output := read_output(path)) is not None
                for r in output.get("results", [output])]
            with self.lock:
                if planned is not None:
                    stage.total = sum(len(item.get("mixtures", [item])) for item in planned)
                stage.done = len(results)
                stage.errors = sum("error" in r for r in results)
                stage.reused = sum(bool(r.get("reused")) for r in results)
                if plan in TRAINING_PLANS:
                    self.note_best(results)
                if stage.total is not None and stage.done >= stage.total:
                    stage.ended = time.monotonic()

    def note_best(self, results: list[dict]) -> None:
        for r in results:
            if "val_loss" in r:
                weights = (self.target if isinstance(self.target, dict)
                           else {d: 1 / len(r["weights"]) for d in r["weights"]})
                loss = target_loss(r["val_loss"], weights)
                if self.best is None or loss < self.best[1]:
                    self.best = (r["id"], loss)

    def render(self) -> Table:
        """The live view: a row per stage (a bar for each fan-out), then the best proxy."""
        now = time.monotonic()
        table = Table.grid(padding=(0, 1))
        with self.lock:
            for stage in self.stages.values():
                mark = (Text("✗", "red") if stage.failed else Text("✓", "green")
                        if stage.ended else Spinner("dots", style="cyan"))
                bar, counts = Text(""), Text("")
                if stage.plan:
                    bar = ProgressBar(total=stage.total or None, completed=stage.done, width=24)
                    eta = stage.eta(now)
                    counts = Text(stage.counts() + (f", ETA {eta:.0f} s" if eta else ""))
                table.add_row(mark, stage.label, bar, counts, f"{stage.seconds(now):6.1f} s")
            if self.best:
                table.add_row("", "best proxy", Text(self.best[0]),
                              Text(f"target loss {self.best[1]:.4f}"), "")
        return table

    def finished_lines(self, printed: set[str]) -> list[str]:
        """Plain lines for the stages that ended since the last call (not on a terminal)."""
        now = time.monotonic()
        lines = []
        with self.lock:
            for stage in self.stages.values():
                if stage.ended is None or stage.name in printed:
                    continue
                printed.add(stage.name)
                outcome = "FAILED" if stage.failed else "done"
                counts = f": {stage.counts()}" if stage.plan else ""
                best = (f"; best proxy {self.best[0]} (target loss {self.best[1]:.4f})"
                        if stage.plan in TRAINING_PLANS and self.best else "")
                lines.append(f"{stage.label:<24} {outcome} in {stage.seconds(now):5.1f} s"
                             f"{counts}{best}")
        return lines


class Display:
    """Shows a RunView while the pipeline runs: live on a terminal, plain lines elsewhere."""

    def __init__(self, view: RunView, console: Console, header: str):
        self.view, self.console, self.header = view, console, header
        self.stopped = threading.Event()
        self.printed: set[str] = set()
        self.live = (Live(get_renderable=lambda: Group(header, view.render()), console=console,
                          refresh_per_second=4) if console.is_terminal else None)
        self.poller = threading.Thread(target=self.poll_loop, daemon=True)

    def __enter__(self):
        # Its threads block Ctrl-C and SIGTERM (a thread inherits the mask it starts with): the
        # kernel then hands them to the main thread, whose blocking wait on a task they interrupt
        signals = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if self.live:
                self.live.start()
            else:
                self.console.print(self.header)
            self.poller.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, signals)
        return self

    def poll_loop(self) -> None:
        while not self.stopped.wait(1.0):
            self.update()

    def update(self) -> None:
        self.view.poll()
        if not self.live:
            for line in self.view.finished_lines(self.printed):
                self.console.print(line)

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.poller.join()
        self.update()  # the last outputs, then the final state
        if self.live:
            self.live.stop()
