"""The arguments of an apollo wrapper as a dataclass that travels with its checkpoints (like peft's ``LoraConfig``).

``a.config`` is an ``ApolloConfig``; ``a.save_pretrained(folder)`` writes it as ``growops_config.json`` beside the
weights, with the schedule position (the optimizer step); the Trainer callback writes it into every checkpoint.
``growops.from_pretrained(model, folder)`` rebuilds the wrapper from it. Only JSON values travel: a callable sampler
or an edited plan is named in the error and passed again to ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .errors import GrowopsError

CONFIG_NAME = "growops_config.json"
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class ApolloConfig:
    """Every argument of ``growops.apollo`` that decides training (``example_inputs`` and ``plan`` only help find the
    stacks). ``sampler`` is a builtin sampler's name; a callable one is saved by name only (``sampler_callable``)."""

    stages: tuple[int, ...]
    stage_steps: tuple[int, ...]
    sampler: str | None = "lvps"
    growth: str = "interpolate"
    optimizer_state: str = "reset"
    seed: int = 0
    stack: str | tuple[str, ...] | None = None
    resample: str = "step"
    shared_linear: bool | str = "auto"
    lr_scale: str = "none"
    rewarmup: int = 0
    sampler_callable: str | None = None  # "module:qualname" of a callable sampler, which JSON cannot hold

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``growops.apollo`` (a callable sampler must be given again: it raises)."""
        if self.sampler_callable is not None:
            raise GrowopsError(f"this checkpoint was trained with the callable sampler {self.sampler_callable}, which "
                               "a config file cannot hold: pass it again, growops.from_pretrained(model, folder, "
                               "sampler=your_sampler)")
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sampler_callable"}
        return {**out, "stages": tuple(self.stages), "stage_steps": tuple(self.stage_steps)}

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (tuples as lists), as ``growops_config.json`` stores them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ApolloConfig:
        """The config `data` (``to_dict``'s form) describes; a GrowopsError naming fields this version lacks."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise GrowopsError(f"growops config has fields this version does not know: {unknown}; it was written by "
                               "another version of growops")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**data)


def save_config(folder: str | os.PathLike, config: ApolloConfig, step: int, fingerprint: dict | None = None) -> None:
    """Write `config`, the schedule position `step` and the wrapper's `fingerprint` (what it resolved: the stacks'
    paths, a sampler's code digest) to ``folder/growops_config.json``."""
    text = json.dumps({"format": FORMAT, "step": step, "config": config.to_dict(), "fingerprint": fingerprint},
                      indent=2)
    (Path(folder) / CONFIG_NAME).write_text(text + "\n")


def load_config(folder: str | os.PathLike) -> tuple[ApolloConfig, int, dict | None]:
    """``(config, step, fingerprint)`` read from ``folder/growops_config.json``; a GrowopsError naming the file if it
    is missing or damaged."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise GrowopsError(f"{folder} has no {CONFIG_NAME}: save with a.save_pretrained(folder) (the Trainer's "
                           "ApolloCallback writes it into every checkpoint-N folder, not into trainer.save_model's: "
                           "call a.save_pretrained there)")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        step = data["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step {step!r} is not a non-negative int")
        fingerprint = data.get("fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, dict):
            raise ValueError(f"fingerprint {fingerprint!r} is not a dict")
        return ApolloConfig.from_dict(data["config"]), step, fingerprint
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise GrowopsError(f"{path} is damaged ({type(e).__name__}: {e}); was it written by growops?") from None
