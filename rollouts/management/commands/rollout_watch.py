"""`manage.py rollout_watch ID`: follow a rollout with live progress bars until it ends.

Exit status by the final state: 0 succeeded, 3 rolled back, 4 aborted, 5 still going when
`--timeout` ran out; a rollout that does not exist is a usage error (1). A draft or paused
rollout is followed until it ends, as an operator would wait for it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from rollouts.dashboard.progress import RolloutProgress, rollout_progress
from rollouts.models import Rollout, RolloutState

EXIT_SUCCEEDED = 0
EXIT_ROLLED_BACK = 3
EXIT_ABORTED = 4
EXIT_TIMED_OUT = 5
EXIT_BY_STATE = {
    RolloutState.SUCCEEDED: EXIT_SUCCEEDED,
    RolloutState.ROLLED_BACK: EXIT_ROLLED_BACK,
    RolloutState.ABORTED: EXIT_ABORTED,
}
NO_SUCH_ROLLOUT = "no rollout with id {rollout_id}"


def headline(progress: RolloutProgress) -> str:
    rollout = progress.rollout
    stage = f"stage {rollout.stage_index + 1}/{len(progress.stages)}"
    return (
        f"{rollout} | {rollout.get_state_display()} | {stage} | "
        f"failure rate {progress.failure_rate:.2%} of a {progress.budget:.2%} budget | "
        f"{progress.population} agents"
    )


def stage_line(progress: RolloutProgress, index: int) -> str:
    stage = progress.stages[index]
    counts = stage.counts
    return (
        f"stage {index} ({stage.size}): {counts.applied}/{counts.targeted} applied, {counts.failed} failed, "
        f"{counts.pending} pending, {counts.offline} offline"
        + (f", {stage.failed_answers} failed answers" if stage.failed_answers != counts.failed else "")
    )


def plain_line(progress: RolloutProgress) -> str:
    """The whole picture on one line: what a pipe or a log file gets on every change."""
    parts = [headline(progress)]
    parts += [stage_line(progress, stage.index) for stage in progress.stages if stage.reached]
    if progress.rollback is not None:
        parts.append(f"rollback: {progress.rollback['reverted']}/{progress.rollback['targeted']} back on stable")
    return " | ".join(parts)


def render(progress: RolloutProgress) -> Group:
    table = Table.grid(padding=(0, 1))
    table.add_column(no_wrap=True)
    table.add_column(width=40)
    table.add_column(no_wrap=True)
    for stage in progress.stages:
        counts = stage.counts
        marker = ">" if stage.current else " "
        bar = ProgressBar(total=max(counts.targeted, 1), completed=counts.applied, width=40)
        detail = (
            f"{counts.applied}/{counts.targeted} applied  {max(counts.bad, stage.failed_answers)} failed  "
            f"{counts.pending} pending  {counts.offline} offline"
        )
        if stage.requires_approval and not stage.approved:
            detail += "  (needs approval)"
        table.add_row(f"{marker} stage {stage.index} ({stage.size})", bar, detail)
    parts: list[Any] = [Text(headline(progress), style="bold red" if progress.over_budget else "bold"), table]
    if progress.rollback is not None:
        rollback = progress.rollback
        parts.append(
            Text(
                f"rolling back: {rollback['reverted']}/{rollback['targeted']} back on the stable version, "
                f"{rollback['waiting']} waiting, {rollback['offline']} offline"
            )
        )
    return Group(*parts)


class Command(BaseCommand):
    help = (
        "Follow a rollout with live progress bars until it ends. Exit status: 0 succeeded, "
        "3 rolled back, 4 aborted, 5 --timeout ran out."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("rollout_id", type=int, metavar="ID")
        parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default: 1)")
        parser.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")

    def handle(self, *args: Any, rollout_id: int, interval: float, timeout: float | None, **options: Any) -> None:
        if not Rollout.objects.filter(pk=rollout_id).exists():
            raise CommandError(NO_SUCH_ROLLOUT.format(rollout_id=rollout_id))
        console = Console(file=self.stdout._out, highlight=False, soft_wrap=not sys.stdout.isatty())
        deadline = None if timeout is None else time.monotonic() + timeout
        code = self._follow(console, rollout_id, interval=max(0.1, interval), deadline=deadline)
        sys.exit(code)

    def _follow(self, console: Console, rollout_id: int, *, interval: float, deadline: float | None) -> int:
        seen_events: set[int] = set()
        last_line = ""
        progress = rollout_progress(rollout_id)
        # On a terminal the bars redraw in place; elsewhere one plain line per change.
        live = Live(render(progress), console=console, auto_refresh=False) if console.is_terminal else None
        if live is not None:
            live.start()
        try:
            while True:
                for event in progress.events:
                    if event.pk not in seen_events:
                        seen_events.add(event.pk)
                        console.print(
                            f"{event.at:%H:%M:%S} {event.kind}"
                            + (f" stage {event.stage_index}" if event.stage_index is not None else "")
                            + (f" ({event.from_state} -> {event.to_state})" if event.from_state else "")
                            + (f": {event.message}" if event.message else ""),
                            markup=False,
                        )
                if live is not None:
                    live.update(render(progress), refresh=True)
                else:
                    line = plain_line(progress)
                    if line != last_line:
                        console.print(line, markup=False)
                        last_line = line
                if progress.ended:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    console.print(f"still {progress.state} when --timeout ran out", markup=False)
                    return EXIT_TIMED_OUT
                time.sleep(interval)
                progress = rollout_progress(rollout_id)
        finally:
            if live is not None:
                live.stop()
        console.print(f"rollout {rollout_id} {progress.rollout.get_state_display()}", markup=False)
        for failed in progress.failed_agents:
            console.print(f"  failed: {failed.name} (stage {failed.stage_index}): {failed.error}", markup=False)
        return EXIT_BY_STATE[RolloutState(progress.state)]
