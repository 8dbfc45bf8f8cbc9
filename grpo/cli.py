"""Command line: `python -m grpo {sft,rm,train,pipeline,eval,bench} RECIPE.yaml [key.sub=value ...]`.

The same command runs under `accelerate launch -m grpo ...`. `pipeline` runs the stages listed in
`run.stages` in order; each stage's saved model feeds the next (sft -> train -> eval; `rm` trains
the reward/cost models that later stages' model rewards point at). The recipe is checked first for
every stage the command runs (`grpo.preflight`: names, batch geometry, lengths, rewards, data, model,
output folder, disk), so a bad one fails before any weights load. Errors a user can cause print
one line (`error: ...`) and exit with code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from grpo.errors import ForcedStop, Interrupted, UserError

log = logging.getLogger("grpo")

COMMANDS = {
    "sft": "supervised fine-tuning (completion-only loss)",
    "rm": "train the usefulness reward model and the safety cost model",
    "train": "GRPO training",
    "pipeline": "run the stages listed in run.stages, each feeding the next",
    "eval": "evaluate models on the held-out set",
    "rollout": "generate and score as GRPO does, no update; dump the rollouts (rollout.dump_dir) for `train --replay`",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grpo", description="GRPO post-training toolkit.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_ in COMMANDS.items():
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("recipe", help="recipe YAML, e.g. recipes/quickstart.yaml")
        s.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. grpo.lr=1e-5")
        s.add_argument("--debug", action="store_true", help="show full tracebacks")
        s.add_argument(
            "--dry-run", action="store_true", help="validate the recipe and batch geometry offline, load nothing, exit"
        )
        s.add_argument(
            "--num-processes", type=int, default=None, help="with --dry-run: the process count to check against"
        )
        if name == "train":
            s.add_argument(
                "--replay",
                default=None,
                metavar="DIR",
                help="train on the rollouts dumped in DIR (rollout.dump_dir / grpo rollout) instead of generating",
            )
        if name == "eval":
            s.add_argument("--model", action="append", default=[], help="model folder(s) to evaluate (repeatable)")
    d = sub.add_parser(
        "doctor", help="check this machine (and a recipe): versions, devices, batch arithmetic, memory, problems"
    )
    d.add_argument("recipe", nargs="?", help="a recipe to check too (its run.stages)")
    d.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    d.add_argument(
        "--num-processes", type=int, default=None, help="process count to check the recipe against (default WORLD_SIZE)"
    )
    d.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def setup_logging(debug: bool = False) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    level = logging.DEBUG if debug else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in (
        "transformers",
        "accelerate",
        "datasets",
        "httpx",
        "urllib3",
        "filelock",
        "torch.distributed",
        "matplotlib",
        "DeepSpeed",
    ):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # silences deepspeed's accelerator probe on CPU machines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; `key=value` overrides may come anywhere after the command, also after
    `--model PATH`, `--dry-run` or `--num-processes N` (argparse alone takes them only before the options)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    setup_logging(args.debug)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    old_term = _stop_on_sigterm()
    try:
        run(args)
        _close_process_group()
    except UserError as e:
        if args.debug:
            raise
        _release_locks()
        return _fail(" ".join(str(e).split()))
    except (Interrupted, ForcedStop) as e:
        _release_locks()
        print(f"stopped: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        _release_locks()
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if old_term is not None:
            import signal

            signal.signal(signal.SIGTERM, old_term)
    return 0


def _stop_on_sigterm():
    """Outside the training loop (which checkpoints first, grpo.runtime.StopRequest), SIGTERM stops the command
    like Ctrl-C does: cleanly, stage locks released, exit code 143. Single-process runs only: a launcher's
    workers keep the default (they may sit in a collective that a Python handler would wait for). Returns the
    handler it replaced, or None."""
    import signal
    import threading

    if _env_int("WORLD_SIZE", 1) != 1 or threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def stop(signum, frame):
        raise ForcedStop("received SIGTERM", code=128 + signum)

    return signal.signal(signal.SIGTERM, stop)


def _env_int(name: str, default: int) -> int:
    """An integer environment variable; `default` when unset, -1 when malformed (preflight reports that one)."""
    raw = os.environ.get(name, "").strip()
    return default if not raw else int(raw) if raw.isdigit() else -1


def _release_locks() -> None:
    runtime = sys.modules.get("grpo.runtime")  # loaded if any stage locked its folder
    if runtime is not None:
        runtime.release_all()


RANK_ERROR_DELAY_S = 5.0


def _close_process_group() -> None:
    """After a finished distributed run, destroy the process group before the interpreter exits: left to the
    exit, a rank's communication threads were torn down while still joinable ("terminate called without an active
    exception", SIGABRT: the launch failed after the run had saved everything)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _fail(message: str) -> int:
    """Print `error: message` once and return 2.

    Every rank of a launch hits a recipe problem alike, so rank 0 prints at once and the other ranks wait
    `RANK_ERROR_DELAY_S` first: the launcher stops every worker when the first one exits, and a rank > 0 that
    exited first used to take rank 0 down before its line was printed (the user saw no reason at all). A problem
    only a rank > 0 hits is still printed, after the wait. Under `accelerate launch` / torchrun the line also goes
    into the worker's error file at once, so the launcher's failure summary names it instead of "To enable
    traceback see ..."; the launcher itself still raises (a non-zero exit of any worker is its failure; the exit
    code must stay non-zero).
    """
    rank = _env_int("RANK", 0)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        import json
        import time

        try:
            with open(error_file, "w") as f:
                json.dump({"message": f"error: {message}", "timestamp": int(time.time())}, f)
        except OSError:
            pass
    if rank > 0:
        import time

        time.sleep(RANK_ERROR_DELAY_S)  # the launcher ends this worker here when rank 0 has said it
    print("error: " + message, file=sys.stderr)  # rank 0, no launcher, or a malformed RANK: say it rather than nothing
    return 2


SFT_NOT_USED = "without an sft stage before it"  # the start line's hint: logged as a warning


def start_line(recipe, command: str) -> str | None:
    """What a stand-alone stage starts from, and why: the first line it logs. A pipeline whose stages have no `sft`
    starts its first GRPO stage the same way (from model.name_or_path), and says so the same way."""
    from pathlib import Path

    from grpo.checkpoint import find_resume

    together = "run the stages together with `grpo pipeline`"
    if command == "pipeline":
        first = next((x for x in recipe.run.stages if x in ("sft", "train", "train_unconstrained")), None)
        if first in (None, "sft"):
            return None
        command, together = first, "put sft in run.stages"
    if command not in ("sft", "train", "train_unconstrained"):
        return None
    base = recipe.model.name_or_path
    if command != "sft":
        try:
            ckpt = find_resume(Path(recipe.run.output_dir) / command, recipe.grpo.resume)
        except UserError:
            ckpt = None  # preflight reports it
        if ckpt:
            return f"{command}: continuing the run in {ckpt.parent} from {ckpt} (grpo.resume)"
    line = f"{command}: starting from model.name_or_path={base}"
    sft_final = Path(recipe.run.output_dir) / "sft" / "final"
    if command != "sft" and sft_final.is_dir() and Path(base).resolve() != sft_final.resolve():
        line += (
            f" ({SFT_NOT_USED}, GRPO starts from model.name_or_path, not from {sft_final}: to continue "
            f"from the SFT model add model.name_or_path={sft_final}, or {together})"
        )
    return line


def run(args) -> None:
    from grpo.config import load_recipe
    from grpo.preflight import check, env_world_size

    if args.command == "doctor":
        return doctor(args)
    replay = getattr(args, "replay", None)
    recipe = load_recipe(args.recipe, [*args.overrides, *([f"rollout.replay_dir={replay}"] if replay else [])])
    stages = recipe.run.stages if args.command == "pipeline" else [args.command]
    line = None if args.dry_run else start_line(recipe, args.command)
    if line:
        (log.warning if SFT_NOT_USED in line else log.info)(line)
    if args.dry_run:
        from grpo.preflight import dry_run

        print(dry_run(recipe, stages, args.num_processes or env_world_size()))
        return
    check(
        recipe, stages, env_world_size(), models=getattr(args, "model", None) or None
    )  # before any weights or folders
    if args.command == "pipeline":
        from grpo.pipeline import run_pipeline

        run_pipeline(recipe)
    else:
        from grpo.pipeline import run_stage

        run_stage(recipe, args.command, models=getattr(args, "model", None) or None)


def doctor(args) -> None:
    """`grpo doctor [RECIPE]` (grpo/doctor.py): prints the report; problems raise one UserError (exit 2) after it."""
    from grpo.config import load_recipe
    from grpo.doctor import environment, recipe_report
    from grpo.preflight import env_world_size

    lines, problems = environment()
    if args.recipe:
        more, recipe_problems = recipe_report(
            load_recipe(args.recipe, args.overrides), args.num_processes or env_world_size()
        )
        lines, problems = lines + more, problems + recipe_problems
    print("\n".join(lines))
    for p in problems:
        print(f"problem: {p}")
    if problems:
        raise UserError(f"grpo doctor found {len(problems)} problem(s), listed above")
    print("doctor: no problems found")


if __name__ == "__main__":
    sys.exit(main())
