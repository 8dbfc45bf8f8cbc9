"""`python -m grpo pipeline RECIPE`: the stages in `run.stages`, in order, each feeding the next.

sft -> its final model starts `train` (and `train_unconstrained`, the same GRPO run with
safety.enabled=false, a baseline for the constraint); `eval` compares the base model and every
stage's final model side by side. `rm` trains the reward/cost models the recipe's model
rewards point at, so it must come before `train`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from grpo.config import STAGES, Recipe, unconstrained
from grpo.errors import UserError

log = logging.getLogger(__name__)


def run_stage(recipe: Recipe, stage: str, model_path: str | None = None, *, models: list[str] | None = None):
    """Run one stage; returns the model the next stage starts from (or the eval results for `eval`).

    `model_path`: the previous stage's final model (None = model.name_or_path). The CLI's single-stage
    commands and the pipeline both dispatch here.
    """
    if stage == "sft":
        from grpo.sft import run_sft

        return str(run_sft(recipe, model_path))
    if stage == "rm":
        from grpo.rm import run_rm

        run_rm(recipe)
        return model_path
    if (
        stage == "train_unconstrained"
    ):  # a baseline: same recipe without the constraints (costs scored and logged, weight 0)
        from grpo.trainer import run_grpo

        run_grpo(unconstrained(recipe), model_path, stage="train_unconstrained")
        return model_path
    if stage == "train":
        from grpo.trainer import run_grpo

        return str(run_grpo(recipe, model_path))
    if stage == "eval":
        from grpo.evaluate import run_eval

        return run_eval(recipe, models=models)
    if stage == "rollout":
        from grpo.trainer import run_rollout

        run_rollout(recipe, model_path)
        return model_path
    raise UserError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")


def run_pipeline(recipe: Recipe) -> dict:
    stages = recipe.run.stages
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise UserError(f"run.stages={stages}: unknown stage(s) {bad}; valid: {', '.join(STAGES)}")
    current = None  # the model the next stage starts from; None = model.name_or_path
    timings, results = {}, None
    for stage in stages:
        t0 = time.perf_counter()
        log.info("=== pipeline stage: %s ===", stage)
        out = run_stage(recipe, stage, current)
        if stage == "eval":
            results = out
        else:
            current = out
        timings[stage] = time.perf_counter() - t0
    log.info("pipeline done: %s", ", ".join(f"{s} {t:.0f}s" for s, t in timings.items()))
    if int(os.environ.get("RANK", "0")) == 0:
        from grpo.report import write_report

        log.info("report: %s", write_report(Path(recipe.run.output_dir)))
    return {"timings": timings, "eval": results}
