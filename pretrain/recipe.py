"""`python -m pretrain.recipe recipe=NAME [overrides]` (or `python -m pretrain recipe=NAME ...`): run the stages
of ``conf/recipe/NAME.yaml`` one after another, each an ordinary `python -m pretrain` run in its own folder
``<run dir>/<stage name>``.

A stage is a list of Hydra overrides on top of ``conf/config.yaml`` and the command line's own overrides (the
stage's win). Stage k > 0 starts from stage k-1's final weights through ``model.init_from=<its checkpoints>``;
what carries over is the weights only: the optimizer state, the LR schedule, the step count and the data
position start fresh, as each stage's own overrides set them (the Qwen2 long-context stage has its own
warmup/decay, length and mixture). A stage that changes the RoPE base must say ``model.rope_change_ok=true``.
A finished stage leaves ``<stage>/STAGE_DONE``; running the recipe again skips finished stages and resumes the
one it was in from its own latest checkpoint (an ordinary resume, bit-identical), so a requeue just re-runs
the command.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from common.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DONE = "STAGE_DONE"


def load_recipe(name: str) -> dict:
    path = REPO / "conf" / "recipe" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"recipe={name} is not a recipe (conf/recipe/: {', '.join(known)})")
    recipe = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    stages = recipe.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"recipe={name}: 'stages' must be a non-empty list")
    names = [s.get("name") for s in stages]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"recipe={name}: every stage needs a distinct name, got {names}")
    return recipe


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def stage_commands(recipe: dict, run_dir: Path, overrides: list[str]) -> list[tuple[str, Path, list[str]]]:
    """(stage name, stage folder, `python -m pretrain` arguments) for each stage, in order."""
    out, previous = [], None
    for stage in recipe["stages"]:
        folder = run_dir / stage["name"]
        own = stage.get("overrides", [])
        keys = {_key(o) for o in own}  # Hydra refuses two values for one key: the stage's wins
        args = [*(o for o in overrides if _key(o) not in keys), *own, f"hydra.run.dir={folder}",
                f"trainer.run_name={run_dir.name}-{stage['name']}"]
        if previous is not None:
            args.append(f"model.init_from={previous / 'checkpoints'}")
        out.append((stage["name"], folder, args))
        previous = folder
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        names = [a.split("=", 1)[1] for a in argv if a.startswith("recipe=")]
        if len(names) != 1:
            raise ConfigError("recipe=NAME is required once (conf/recipe/)")
        recipe = load_recipe(names[0])
        run_dirs = [a.split("=", 1)[1] for a in argv if a.startswith("recipe.run_dir=")]
        run_dir = Path(run_dirs[-1] if run_dirs else REPO / "runs" / names[0]).resolve()
        overrides = [a for a in argv if not a.startswith(("recipe=", "recipe.run_dir="))]
        for bad in overrides:
            if bad.startswith(("hydra.run.dir=", "model.init_from=")):
                raise ConfigError(f"{bad.split('=')[0]} is set per stage by the recipe")
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    for name, folder, args in stage_commands(recipe, run_dir, overrides):
        if (folder / DONE).is_file():
            print(f"recipe {names[0]}: stage {name} already done ({folder})", flush=True)
            continue
        print(f"recipe {names[0]}: stage {name} -> {folder}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "pretrain", *args], env=os.environ.copy())
        if proc.returncode:
            sys.exit(proc.returncode)  # the stage printed its own error; re-running resumes it
        (folder / DONE).write_text("done\n")


if __name__ == "__main__":
    main()
