"""`geodino <verb> [hydra overrides]` — the command-line entry point.

Hydra has no sub-commands (its maintainers' position: hydra issues #409, #1964), so this module pops
the verb, validates the overrides against the config groups shipped in ``geodino.configs`` and
composes the verb's config with Hydra's compose API. Every user error ends in one line that names
the bad verb, group, option or key and lists the valid choices — never a Python traceback.

Verbs: train, eval, segment, curate, export, info.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from geodino.config import config_dirs, configs_dir, group_files, user_config_dirs
from geodino.errors import GeodinoError

VERBS: dict[str, str] = {
    "train": "run a training stage (pretrain, gram, highres, distill, text) on a data source",
    "eval": "score a backbone on an EO benchmark (loveda, geobench, canopy; *_paper: the paper protocols) or a dino.txt model (ov); eval compare RUN_A RUN_B",
    "segment": "open-vocabulary segmentation of a raster from text prompts",
    "curate": "data curation: band statistics, balanced sampling, retrieval",
    "export": "export a backbone: official DINOv3 layout, safetensors, timm or Hugging Face folder, ONNX",
    "info": "versions, devices, threads and where the configs live",
}

# Verbs whose first bare word (no '=', no leading '-') names an option of a config group:
# `geodino eval loveda` == `geodino eval task=loveda`.
_BARE_WORD_GROUP = {"eval": "task"}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def config_groups(verb: str) -> dict[str, list[str]]:
    """Config groups used by a verb's primary config, with their options (sorted; $GEODINO_CONFIG_PATH included)."""
    return {group: sorted(group_files(group)) for group in _groups_of(verb)}


def _groups_of(verb: str) -> list[str]:
    import yaml  # PyYAML arrives with hydra-core / omegaconf

    path = configs_dir() / f"{verb}.yaml"
    if not path.is_file():
        return []
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    out: list[str] = []
    for entry in doc.get("defaults", []) or []:
        if isinstance(entry, dict):
            out.extend(k for k in entry if not k.startswith("override"))
    # Groups that exist as folders but are not in the defaults list can still be selected
    # with `+group=option`; the known ones for train are listed explicitly so --help shows them.
    return out


def _top_level_keys(verb: str) -> list[str]:
    import yaml

    with open(configs_dir() / f"{verb}.yaml") as f:
        doc = yaml.safe_load(f) or {}
    return sorted(k for k in doc if k != "defaults")


@dataclass
class Parsed:
    verb: str
    overrides: list[str]
    print_cfg: bool = False
    help: bool = False


def parse_argv(argv: Sequence[str]) -> Parsed:
    if not argv or argv[0] in ("-h", "--help", "help"):
        return Parsed(verb="", overrides=[], help=True)
    verb, rest = argv[0], list(argv[1:])
    if verb in ("-V", "--version"):
        return Parsed(verb="version", overrides=[])
    if verb not in VERBS:
        raise CLIError(f"unknown verb '{verb}'; choose one of: {', '.join(VERBS)}")
    parsed = Parsed(verb=verb, overrides=[])
    for i, arg in enumerate(rest):
        if arg in ("-h", "--help"):
            parsed.help = True
        elif arg in ("--cfg", "--print-config"):
            parsed.print_cfg = True
        elif arg.startswith("-"):
            raise CLIError(f"geodino {verb}: unknown flag '{arg}'; flags are --help and --cfg")
        elif "=" not in arg:
            group = _BARE_WORD_GROUP.get(verb)
            if group is None or i != 0:
                raise CLIError(
                    f"geodino {verb}: '{arg}' is not an override; write key=value "
                    f"(e.g. {_example(verb)})"
                )
            parsed.overrides.append(f"{group}={arg}")
        else:
            parsed.overrides.append(arg)
    return parsed


def _example(verb: str) -> str:
    return {
        "train": "stage=gram data=sat",
        "eval": "task=loveda root=/data/LoveDA",
        "segment": "input=scene.tif prompts=[water,forest]",
        "curate": "action=stats",
        "export": "checkpoint=run/ format=official",
    }.get(verb, "key=value")


def validate_overrides(verb: str, overrides: Sequence[str]) -> None:
    """Check group selections before Hydra sees them, so errors are one line with the choices."""
    groups = config_groups(verb)
    for ov in overrides:
        key, _, value = ov.partition("=")
        key = key.lstrip("+~")
        if key in groups or any((root / key).is_dir() for root in config_dirs()) and key not in ("__pycache__",):
            options = groups.get(key) or sorted(group_files(key))
            if value not in options:
                raise CLIError(
                    f"geodino {verb}: unknown {key} '{value}'; choose one of: {', '.join(options)}"
                )


def compose(verb: str, overrides: Sequence[str]):
    """Compose the verb's config (an OmegaConf DictConfig) or raise CLIError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    validate_overrides(verb, overrides)
    GlobalHydra.instance().clear()
    try:
        user = [f"file://{d.resolve()}" for d in user_config_dirs()]
        search = [f"hydra.searchpath=[{','.join(user)}]"] if user else []
        with initialize_config_module(config_module="geodino.configs", version_base="1.3"):
            cfg = hydra_compose(config_name=verb, overrides=[*search, *overrides])
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise CLIError(f"geodino {verb}: {_one_line_hydra_error(verb, e)}") from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def _one_line_hydra_error(verb: str, e: Exception) -> str:
    msg = " ".join(str(e).split())
    if "not in struct" in msg or "Could not override" in msg or "Key '" in msg and "not" in msg:
        import re

        m = re.search(r"Key '([^']+)'", msg) or re.search(r"override '([^']+)'", msg)
        key = m.group(1) if m else "?"
        if "." in key:
            parent, _, leaf = key.rpartition(".")
            return f"unknown option '{key}': '{parent}' has no key '{leaf}' (add a new key with +{key}=...)"
        return (
            f"unknown option '{key}'; top-level keys are: {', '.join(_top_level_keys(verb))} "
            f"(add a new key with +{key}=...)"
        )
    return msg


def format_help(verb: str | None) -> str:
    if not verb:
        width = max(len(v) for v in VERBS)
        lines = [
            "usage: geodino <verb> [group=option ...] [key=value ...] [--cfg] [--help]",
            "",
            "DINOv3 self-supervised training, evaluation and text alignment for natural and",
            "Earth-observation imagery.",
            "",
            "verbs:",
            *[f"  {v.ljust(width)}  {d}" for v, d in VERBS.items()],
            "",
            "examples:",
            "  geodino train stage=pretrain data=sample_sat model=vit_tiny",
            "  geodino train stage=gram data=sat data.paths=[/data/s2] init=outputs/train/pretrain/<run>",
            "  geodino eval loveda root=/data/LoveDA backbone=dinov3_vitl16 weights=vitl16_sat.pth",
            "  geodino info",
            "",
            "`geodino <verb> --help` lists that verb's config groups, options and keys.",
        ]
        return "\n".join(lines)
    lines = [f"usage: geodino {verb} [group=option ...] [key=value ...] [--cfg] [--help]", "", VERBS[verb]]
    if verb == "info":
        return "\n".join(lines)
    groups = config_groups(verb)
    if groups:
        lines += ["", "config groups (group=option):"]
        for g, opts in groups.items():
            lines.append(f"  {g}: {', '.join(opts)}")
    lines += ["", f"top-level keys: {', '.join(_top_level_keys(verb))}"]
    if verb in _BARE_WORD_GROUP:
        g = _BARE_WORD_GROUP[verb]
        lines += ["", f"the first bare word selects {g}: `geodino {verb} loveda` == `geodino {verb} {g}=loveda`"]
    lines += [
        "",
        "--cfg prints the composed config and exits; overrides use Hydra syntax (a.b=1, +new=2, list=[x,y]).",
        f"configs live in {configs_dir()}",
    ]
    return "\n".join(lines)


def _handlers() -> dict[str, Callable]:
    # Imported lazily: `geodino --help` and bad overrides must answer without importing torch.
    def train(cfg):
        from geodino.train.run import run_train

        return run_train(cfg)

    def evaluate(cfg):
        if str(cfg.task.name) == "ov":  # open-vocabulary scoring needs the segmenter (a layer above geodino.eval)
            from geodino.segment.evaluate import run_ov_eval

            return run_ov_eval(cfg)
        from geodino.eval.run import run_eval

        return run_eval(cfg)

    def segment(cfg):
        from geodino.segment.run import run_segment

        return run_segment(cfg)

    def curate(cfg):
        from geodino.verbs.curate import run_curate

        return run_curate(cfg)

    def export(cfg):
        from geodino.verbs.export import run_export

        return run_export(cfg)

    return {"train": train, "eval": evaluate, "segment": segment, "curate": curate, "export": export}


def info() -> str:
    import platform

    import torch

    lines = [f"geodino {_version()}", f"python {platform.python_version()} ({sys.executable})"]
    for mod in ("torch", "torchvision", "timm", "torchgeo", "rasterio", "open_clip", "hydra", "faiss", "torchmetrics"):
        try:
            m = __import__(mod)
            lines.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as e:  # report, never fail: info is the first thing a user runs
            lines.append(f"{mod} not importable ({type(e).__name__}: {e})")
    lines.append(f"threads: torch {torch.get_num_threads()}, cpu count {os.cpu_count()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"device cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        lines.append("devices: cpu (no CUDA device visible)")
    lines.append(f"configs: {configs_dir()}")
    return "\n".join(lines)


def _version() -> str:
    from geodino import __version__

    return __version__


def _compare(args: list[str]) -> int:
    """`geodino eval compare RUN_A RUN_B [...] [out=table.md]`."""
    if any(a in ("-h", "--help") for a in args):
        print("usage: geodino eval compare RUN_A RUN_B [RUN_C ...] [out=table.md]\n"
              "  one table of the runs' headline, per-head and per-class numbers (same task), Δ for two runs")
        return 0
    out = [a.split("=", 1)[1] for a in args if a.startswith("out=")]
    runs = [a for a in args if not a.startswith("out=")]
    try:
        from geodino.eval.compare import run_compare

        run_compare(runs, out[-1] if out else None)
        return 0
    except GeodinoError as e:
        print(f"error: geodino eval compare: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["eval", "compare"]:
        return _compare(argv[2:])
    try:
        parsed = parse_argv(argv)
        if parsed.verb == "version":
            print(f"geodino {_version()}")
            return 0
        if parsed.help:
            print(format_help(parsed.verb))
            return 0
        if parsed.verb == "info":
            if parsed.overrides:
                raise CLIError("geodino info takes no overrides")
            print(info())
            return 0
        cfg = compose(parsed.verb, parsed.overrides)
        from geodino.schema import validate

        validate(parsed.verb, cfg)  # every value, before any data is read or any model built
        if parsed.print_cfg:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg))
            return 0
        _handlers()[parsed.verb](cfg)
        return 0
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (GeodinoError, FileNotFoundError) as e:
        # Bad input found by a verb (a missing file, a band absent from a raster, a checkpoint key
        # that does not fit): one line; GEODINO_DEBUG=1 shows the traceback.
        if os.environ.get("GEODINO_DEBUG"):
            raise
        print(f"error: geodino {parsed.verb}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `geodino train --cfg | head`
        sys.stderr.close()
        return 0
    except OSError as e:
        # a write that no verb wrapped (geodino.outputs): a full disk, a read-only file system or a refused
        # permission is still one line naming the file; anything else keeps its traceback
        from geodino.outputs import write_error

        err = write_error(e.filename or "an output", e)
        if err is None or os.environ.get("GEODINO_DEBUG"):
            raise
        print(f"error: geodino {parsed.verb}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
