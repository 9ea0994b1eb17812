"""Zero-shot accuracy of an in-memory model through EleutherAI's lm-evaluation-harness.

lm-eval (the optional extra ``prunescope[eval]``) scores each multiple-choice item by the
log-likelihood of every choice given the question; we hand it the model object itself (its
``HFLM`` wrapper over a ``PreTrainedModel``), so a model pruned in this process is measured as it
is, without saving and reloading it. Tasks are lm-eval's own names or YAML task definitions in a
folder passed as ``include_path`` (which works offline when their data are local files).
"""

from __future__ import annotations

import difflib
import functools
import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunescope import models
from prunescope.errors import PrunescopeError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# the metrics we report, each with its standard error (lm-eval keys them "<metric>,<filter>")
METRICS = ("acc", "acc_norm")


def _lm_eval() -> Any:
    """The ``lm_eval`` package, or a PrunescopeError saying how to install it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (HFLM)
        import lm_eval.tasks  # noqa: F401  (TaskManager)
    except ImportError as exc:
        raise PrunescopeError(
            f"zero-shot accuracy needs lm-eval, which is not installed ({exc}); "
            "run: pip install 'prunescope[eval]'"
        ) from None
    return lm_eval


def _folder_fingerprint(folder: Path) -> tuple[tuple[str, int], ...]:
    """Names and modification times of the YAML files under ``folder``: the cache key of its index,
    so that an edited or added task definition is seen by the next call."""
    return tuple(sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*.y*ml")))


@functools.lru_cache(maxsize=4)
def _cached_manager(include_path: str | None, fingerprint: tuple[tuple[str, int], ...]) -> "TaskManager":
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def task_manager(include_path: Path | None = None) -> "TaskManager":
    """lm-eval's index of its built-in tasks plus those defined under ``include_path``.

    Indexing the ~15,000 built-in task files takes several seconds, so one index is kept per folder
    (and per state of its YAML files)."""
    _lm_eval()
    if include_path is None:
        return _cached_manager(None, ())
    folder = Path(include_path)
    if not folder.is_dir():
        raise PrunescopeError(
            f"include path {folder} is not a folder; pass a folder of lm-eval YAML task definitions"
        )
    return _cached_manager(str(folder.resolve()), _folder_fingerprint(folder))


def check_tasks(tasks: Sequence[str], manager: "TaskManager") -> tuple[str, ...]:
    """The task names, stripped; a PrunescopeError for none at all or one lm-eval does not know
    (with the closest known names)."""
    names = tuple(t.strip() for t in tasks if t.strip())
    if not names:
        raise PrunescopeError("no task given; pass lm-eval task names such as hellaswag,arc_easy")
    known = manager.all_tasks
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"close names: {', '.join(close)}" if close else "list them with `lm-eval ls tasks`"
            raise PrunescopeError(
                f"unknown lm-eval task {name!r}; {hint} (or define it in a YAML file under --include-path)"
            )
    return names


# task names whose data each (cached) manager has already built once in this process
_REACHED: "weakref.WeakKeyDictionary[TaskManager, set[str]]" = weakref.WeakKeyDictionary()


def check_reachable(names: Sequence[str], manager: "TaskManager") -> None:
    """Build each task once, which downloads (or reads) its dataset, so that a task whose data
    cannot be reached is named in one line instead of failing deep inside lm-eval.

    A task already built by ``manager`` in this process is not built again: the option checks,
    the dense and the pruned measurement all ask, and building a large dataset takes seconds."""
    reached = _REACHED.setdefault(manager, set())
    for name in names:
        if name in reached:
            continue
        try:
            manager.load([name])
        except Exception as exc:  # datasets raises many types: ConnectionError, HfHubHTTPError, FileNotFoundError...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise PrunescopeError(
                f"lm-eval task {name!r} could not load its dataset ({type(exc).__name__}: {first[:200]}); "
                "it may need the internet: use a task whose data are local files (--include-path)"
            ) from exc
        reached.add(name)


def checked_tasks(tasks: Sequence[str], include_path: Path | None = None) -> tuple[tuple[str, ...], "TaskManager"]:
    """The task names and the manager that knows them, every name known and its data reached
    (:func:`check_tasks`, :func:`check_reachable`): what each caller checks before measuring."""
    manager = task_manager(include_path)
    names = check_tasks(tasks, manager)
    check_reachable(names, manager)
    return names, manager


def check_counts(limit: int | None, batch_size: int | None = None, flag: str = "") -> None:
    """A PrunescopeError unless ``limit`` (items per task; None = all) and ``batch_size`` (None:
    not given) are positive; ``flag`` is the option prefix the user typed (``"--"``, ``"--tasks-"``)."""
    if limit is not None and limit < 1:
        raise PrunescopeError(f"{flag}limit must be a positive number of items per task, got {limit}")
    if batch_size is not None and batch_size < 1:
        raise PrunescopeError(f"{flag}batch-size must be a positive number of sequences, got {batch_size}")


def _scores(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``acc`` and ``acc_norm`` with their standard errors per task, from lm-eval's
    ``{"acc,none": 0.5, "acc_stderr,none": 0.1, ...}`` (groups without these metrics are left out)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            base = metric.removesuffix("_stderr")
            if base in METRICS and isinstance(value, (int, float)) and metric not in row:
                row[metric] = float(value)
        if "acc" in row:
            out[task] = row
    return out


def accuracy(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    tasks: Sequence[str],
    limit: int | None = None,
    batch_size: int = 8,
    include_path: Path | None = None,
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy of ``model`` on lm-eval ``tasks``.

    Returns ``{task: {"acc": ..., "acc_stderr": ..., "acc_norm": ..., "acc_norm_stderr": ...}}``
    (``acc_norm`` only where the task reports it: the choice with the highest log-likelihood per
    character). ``limit`` scores only the first ``limit`` items of each task.

    Raises:
        PrunescopeError: lm-eval is not installed, a task is unknown, or its data cannot be
            reached (offline), or ``limit``/``batch_size`` is not positive.
    """
    check_counts(limit, batch_size)
    lm_eval = _lm_eval()
    names, manager = checked_tasks(tasks, include_path)
    lm = lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    started = time.perf_counter()
    output = lm_eval.simple_evaluate(
        model=lm, tasks=list(names), task_manager=manager, limit=limit, num_fewshot=0,
        log_samples=False,
        # zero-shot items are taken in order: no randomness to seed, so leave the caller's
        # global random, numpy and torch generators untouched
        random_seed=None, numpy_random_seed=None, torch_random_seed=None,
    )
    scores = _scores(output["results"])
    log.info("zero-shot %s in %.1f s: %s", ", ".join(names), time.perf_counter() - started,
             "; ".join(f"{t} acc {s['acc']:.3f}" for t, s in scores.items()))
    return scores


@dataclass(frozen=True)
class ZeroShotConfig(models.Placement):
    """What ``prunescope eval`` measures: a model (name or folder), lm-eval task names, an optional
    folder of task definitions, and how many items per task (``limit``; None = all)."""

    model: str = models.DEFAULT_MODEL
    tasks: tuple[str, ...] = ()
    include_path: Path | None = None
    limit: int | None = None
    batch_size: int = 8

    def check(self) -> tuple[str, ...]:
        """Validate every option and reach every task's data before the model is loaded; return
        the task names."""
        check_counts(self.limit, self.batch_size, "--")
        self.check_placement()
        return checked_tasks(self.tasks, self.include_path)[0]


@dataclass(frozen=True)
class ZeroShotResult:
    """Zero-shot accuracies of one model: ``scores[task]`` as returned by :func:`accuracy`."""

    model: str
    tasks: tuple[str, ...]
    limit: int | None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    lm_eval_version: str = ""


def run_zeroshot(config: ZeroShotConfig) -> ZeroShotResult:
    """Check the options and tasks (again cheap after :meth:`ZeroShotConfig.check`: each task's
    data are built once per process), load the model and measure its zero-shot accuracy."""
    from importlib.metadata import version

    names = config.check()
    model, tokenizer = config.load_model(config.model)
    started = time.perf_counter()
    scores = accuracy(model, tokenizer, names, limit=config.limit, batch_size=config.batch_size,
                      include_path=config.include_path)
    return ZeroShotResult(
        model=str(config.model), tasks=names, limit=config.limit, scores=scores,
        seconds=time.perf_counter() - started, lm_eval_version=version("lm_eval"),
    )
