"""A `Reporter` that draws rich progress bars (with ETA) and epoch lines on stderr, and what `adapt` says
of the domain's default head when it is done."""

from __future__ import annotations

from typing import Any

from st2si_cli.cli.output import err, make_progress, progress_enabled, safe_text
from st2si_cli.progress import Reporter


class RichReporter(Reporter):
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.progress = make_progress(transient=False)
        self._task: Any = None
        self._train: Any = None
        self._started = False

    def _start(self) -> None:
        if not self._started and progress_enabled() and not self.quiet:
            self.progress.start()
            self._started = True

    def close(self) -> None:
        if self._started:
            self.progress.stop()
            self._started = False

    def message(self, text: str) -> None:
        if not self.quiet:
            err.print(text, markup=False)

    def features_start(self, total_tokens: int, n_samples: int) -> None:
        self._start()
        self.message(f"Feature pass: {n_samples:,} samples, {total_tokens:,} tokens")
        self._task = self.progress.add_task("features (tokens)", total=total_tokens, rate="")

    def features_advance(self, tokens: int, samples: int) -> None:
        if self._task is not None:
            self.progress.advance(self._task, tokens)
            task = self.progress.tasks[self._task]
            if task.speed:
                self.progress.update(self._task, rate=f"{task.speed:,.0f} tok/s")

    def features_done(self) -> None:
        if self._task is not None:
            self.progress.remove_task(self._task)
            self._task = None

    def training_start(self, steps_per_epoch: int, max_epochs: int) -> None:
        self._start()
        self._steps = steps_per_epoch
        self._train = self.progress.add_task("epoch 1", total=steps_per_epoch, rate="")

    def training_step(self, n: int) -> None:
        if self._train is not None:
            self.progress.advance(self._train, n)

    def epoch(self, record: dict[str, Any]) -> None:
        """One validation point: an epoch end, a point within an epoch (--valid-every) or the start."""
        mark = "*" if record.get("improved") else " "
        end = record.get("end", True)
        where = f"epoch {record['epoch']:3d}" if end else f"epoch {record['epoch']:3d} step {record['step']}"
        if not end and record["epoch"] == 0:
            where = "start    "
        loss = "   -  " if record.get("loss") is None else f"{record['loss']:.4f}"
        self.message(
            f"{where}{mark} loss {loss}  valid NDCG@10 {record['valid_NDCG@10']:.4f}"
            f"  Recall@10 {record['valid_Recall@10']:.4f}  ({record['seconds']:.1f}s)"
        )
        if self._train is not None and end:
            self.progress.reset(self._train, total=self._steps, description=f"epoch {record['epoch'] + 1}")


def say_default_and_reference(zoo: Any, domain: str, head: Any = None, *, reference: bool = True) -> None:
    """On stderr: the domain's default head and why, and how `head` (default: the best LM head) does
    against the domain's in-tool ID-only SASRec, where it has one."""
    from st2si_cli.heads.choice import default_head, lm_over_id_only

    choice = default_head(zoo, domain)
    if choice is not None:
        shown = f"Default head: {choice.head.name or choice.head.short_id}, {choice.reason}."
        err.print(safe_text(shown), markup=False, soft_wrap=True)
    line = lm_over_id_only(zoo, domain, head) if reference else None
    if line:
        err.print(safe_text(line), markup=False, soft_wrap=True)
