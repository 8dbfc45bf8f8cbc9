"""Metrics: one console line per step, `metrics.jsonl` always, wandb / tensorboard when asked, PNG curves.

Only the main process writes. Trackers (`tracking.report_to`): `jsonl` (always on), `wandb`, `tensorboard`
(event files in `<stage dir>/tensorboard`).

wandb never prompts and never blocks on the network unless it may:
- the mode is, in order: `WANDB_MODE=disabled` in the environment (always wins); `tracking.wandb_mode`
  `online` / `offline`; for `auto` (the default) `WANDB_MODE` if set, else `online` only when an API key
  is configured (`WANDB_API_KEY`, or `wandb login`'s entry in ~/.netrc / `$NETRC`), else `offline`;
- `online` without a key logs offline with a warning instead of asking for one (upload later with
  `wandb sync <dir>`); an online start that fails (no network) also falls back to offline;
- files go to `$WANDB_DIR/wandb` if `WANDB_DIR` is set, else `<stage dir>/wandb/offline-run-...`;
  the process environment is not modified;
- secrets are never logged: string values of config keys named like `*key*`, `*token*`, `*secret*`,
  `*password*` and any value equal to `WANDB_API_KEY` are replaced by `<redacted>`, console capture is
  off, and when the command line itself carries such an override wandb's metadata (which records
  argv) is not written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from pathlib import Path

from grpo.config import TrackingConfig
from grpo.recipe_yaml import is_secret_name, redact

log = logging.getLogger(__name__)

TRACKERS = ("jsonl", "wandb", "tensorboard")


class Tracker:
    def __init__(
        self,
        out_dir: Path,
        cfg: TrackingConfig,
        *,
        is_main: bool,
        run_config: dict | None = None,
        name: str = "run",
        resume: bool = False,
        group: str | None = None,
    ):
        self.out_dir, self.cfg, self.is_main = Path(out_dir), cfg, is_main
        self.history: list[dict] = []
        self._wandb = self._tb = None
        if not is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a" if resume else "w")
        unknown = set(cfg.report_to) - set(TRACKERS)
        if unknown:
            log.warning(
                "tracking.report_to: ignoring unknown tracker(s) %s (valid: %s)", sorted(unknown), ", ".join(TRACKERS)
            )
        if "wandb" in cfg.report_to:
            self._wandb = start_wandb(self.out_dir, cfg, redact(run_config or {}), name, group)
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record one step's metrics (floats; non-finite values become null) everywhere."""
        row = {"step": step, **{k: _num(v) for k, v in metrics.items()}}
        self.history.append(row)
        if not self.is_main:
            return
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        values = {k: v for k, v in row.items() if k != "step" and v is not None}
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def log_table(self, step: int, name: str, columns: list[str], rows: list[list]) -> None:
        """A table of samples: `<name>.jsonl` (one row per sample, with `step`) always, a wandb Table when wandb is
        on."""
        if not self.is_main:
            return
        with open(self.out_dir / f"{name}.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **dict(zip(columns, r))}) + "\n")
        if self._wandb is not None:
            import wandb

            cols, data = (columns, rows) if "step" in columns else (["step", *columns], [[step, *r] for r in rows])
            self._wandb.log({name: wandb.Table(columns=cols, data=data)}, step=step)
        if self._tb is not None:
            text = "\n\n".join(" | ".join(f"**{c}**: {v}" for c, v in zip(columns, r)) for r in rows)
            self._tb.add_text(name, text, step)

    def close(self, plots: dict[str, list] | None = None) -> list[Path]:
        """Flush everything and draw PNG curves: {file_stem: [metric keys]}; returns the PNG paths."""
        if not self.is_main:
            return []
        self._jsonl.close()
        pngs = [
            p
            for stem, keys in (plots or {}).items()
            if (
                p := plot_curves(self.history, keys, self.out_dir / f"{stem}.png", title=f"{self.out_dir.name}: {stem}")
            )
        ]
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        return pngs


def _num(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ------------------------------------------------------------------------------------------ wandb
def wandb_mode(cfg: TrackingConfig) -> str:
    """online | offline | disabled, following the module docstring's rules (never 'online' without a key)."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env == "disabled":
        return "disabled"
    mode = cfg.wandb_mode
    if mode == "auto":
        mode = env or ("online" if has_wandb_key() else "offline")
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in ("online", "offline", "disabled"):
        log.warning("WANDB_MODE=%s is not one of online, offline, disabled: logging offline", mode)
        return "offline"
    if mode == "online" and not has_wandb_key():
        log.warning(
            "wandb: online mode asked for but no API key is configured (set WANDB_API_KEY or run `wandb login`); "
            "logging offline instead, upload later with `wandb sync`"
        )
        return "offline"
    return mode


def has_wandb_key() -> bool:
    """True if an API key is in the environment or in the netrc file `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "api.wandb.ai")).split("/")[0].split(":")[0]
    try:
        return netrc.is_file() and host in netrc.read_text(errors="ignore")
    except OSError:
        return False


def start_wandb(out_dir: Path, cfg: TrackingConfig, run_config: dict, name: str, group: str | None = None):
    """A wandb run that cannot prompt: offline unless a key is configured; None when disabled."""
    mode = wandb_mode(cfg)
    if mode == "disabled":
        log.info("wandb: disabled by WANDB_MODE=disabled")
        return None
    import wandb

    folder = os.environ.get("WANDB_DIR") or str(out_dir)
    Path(folder).mkdir(parents=True, exist_ok=True)
    settings = dict(silent=True, console="off", save_code=False, init_timeout=60.0, x_disable_meta=_argv_has_secret())
    kwargs = dict(
        project=os.environ.get("WANDB_PROJECT") or cfg.wandb_project,
        name=name,
        group=group,
        config=run_config,
        dir=folder,
        reinit="finish_previous",
    )
    try:
        run = wandb.init(mode=mode, settings=wandb.Settings(**settings), **kwargs)
    except wandb.errors.Error as e:
        if mode != "online":
            raise
        log.warning(
            "wandb: could not start an online run (%s); logging offline instead, upload later with `wandb sync`",
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        mode = "offline"
        run = wandb.init(mode=mode, settings=wandb.Settings(**settings), **kwargs)
    log.info("wandb: %s run in %s", mode, getattr(run.settings, "sync_dir", folder))
    return run


def _argv_has_secret() -> bool:
    """An override sets a secret-looking key at any depth: `rewards.0.api_key=..` or
    `rewards=[{name: x, api_key: ..}]`."""
    return any("=" in a and any(is_secret_name(k) for k in re.findall(r"\w+(?=\s*[:=])", a)) for a in sys.argv[1:])


# ------------------------------------------------------------------------------------------ curves
LABELS = {
    "reward": "total reward (weighted sum)",
    "kl": "KL to reference (k3, per token)",
    "lambda": "Lagrange multiplier λ",
    "cost": "mean safety cost",
    "completion_len": "completion length (tokens)",
    "clip_frac": "clipped fraction (ratio)",
    "clip_frac_low": "clipped below 1-ε",
    "clip_frac_high": "clipped above 1+ε",
    "tokens_per_s": "rollout throughput (tokens/s)",
    "loss": "training loss",
    "eval_loss": "held-out loss",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
    "zero_std_frac": "groups with zero reward std",
    "truncated_frac": "truncated completions (fraction)",
    "constraint_violation": "samples over the cost threshold",
    "time_step": "step time (s)",
    "time_rollout": "rollout",
    "time_score": "scoring",
    "time_logprobs": "old/ref logprobs",
    "time_train": "update",
    "eval_pair_accuracy": "held-out pair accuracy",
    "eval_sign_accuracy": "held-out sign accuracy",
}


def label(key: str) -> str:
    """A readable name for a metric key; `group/key` is named by its key (the panel title names the group)."""
    key = key.rsplit("/", 1)[-1]
    return LABELS.get(key, key.replace("_", " "))


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (shorter at the start)."""
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def smoothing_window(n: int) -> int:
    """~1/10 of the points, at least 1, at most 50: visible trend on short runs, not a flat line on long ones."""
    return max(1, min(50, round(n / 10)))


def plot_curves(
    history: list[dict],
    keys: list,
    path: Path,
    *,
    title: str | None = None,
    titles: dict[str, str] | None = None,
    hlines: dict[str, tuple[float, str]] | None = None,
) -> Path | None:
    """One panel per entry of `keys` present in `history`; None if nothing to plot.

    An entry is a metric key, or a tuple of keys drawn in one panel with a legend (e.g. `("loss", "eval_loss")`);
    `titles` maps an entry's first key to its panel title (default: readable names from `LABELS`); `hlines` maps
    a key to a (value, legend) horizontal reference line in its panel (e.g. the cost threshold). Each series is drawn
    raw (faint) and as a
    trailing moving average over ~1/10 of its points; sparse series (<= 30 points) get markers.
    """
    panels = []
    for entry in keys:
        group = (entry,) if isinstance(entry, str) else tuple(entry)
        present = [k for k in group if any(r.get(k) is not None for r in history)]
        if present:
            panels.append(((titles or {}).get(group[0]) or " / ".join(label(k) for k in present), present))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 if len(panels) == 1 else 2 if len(panels) in (2, 4) else 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.4 * rows + (0.4 if title else 0)), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels):
        for i, key in enumerate(series):
            _draw_series(ax, history, key, f"C{i}", legend=len(series) > 1)
            if key in (hlines or {}):
                ax.axhline(hlines[key][0], color="black", ls="--", lw=1, label=hlines[key][1])
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


NOT_SMOOTHED = {"lr", "lambda", "epoch"}  # schedules and slow state: drawn as they are


def _draw_series(ax, history: list[dict], key: str, color: str, legend: bool) -> None:
    pts = [(r["step"], r[key]) for r in history if r.get(key) is not None and "step" in r]
    xs, ys = zip(*pts)
    w = 1 if key in NOT_SMOOTHED else smoothing_window(len(ys))
    name = label(key) if legend else None
    if w > 1:
        ax.plot(xs, ys, alpha=0.3, lw=1, color=color, label=None if legend else "per step")
        ax.plot(xs, smooth(list(ys), w), lw=2, color=color, label=name or f"moving avg of {w}")
    else:
        ax.plot(xs, ys, lw=1.5, color=color, marker="o" if len(ys) <= 30 else None, ms=3, label=name)


def truncate_history(path: Path, step: int) -> None:
    """Drop the rows of a metrics.jsonl after `step` (a resumed run logs those steps again)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a half-written last line from a crash
    path.write_text("".join(l + "\n" for l in keep))
