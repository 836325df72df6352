"""Configuration dataclasses and presets. Environment variables are read here and nowhere else."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class PipelineConfig:
    """Behaviour switches of ``conceptseg.pipeline`` (reference defaults, METHOD.md sections 1-2)."""

    router: bool = True  # probe SAM 3 first and take the fast path when it is confident
    strip_parentheticals: bool = True  # benchmark code: drop "(...)" before counting words
    inclusive_threshold: bool = True  # accept when presence >= T (single-example script: >)
    max_new_tokens: int = 768
    max_length: int = 2816  # prompt + completion, as the reference's generate(max_length=...)
    max_prompt_chars: int = 1000
    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 32 << 20
    # decoded pixels of one request, target and references together (memory per request)
    max_request_pixels: int = 60_000_000

    def __post_init__(self) -> None:
        assert 0 < self.max_new_tokens <= self.max_length, "need 0 < max_new_tokens <= max_length"
        assert self.max_prompt_chars > 0 and self.max_image_pixels > 0 and self.max_image_bytes > 0
        assert self.max_request_pixels > 0


PRESETS = {
    "reference": PipelineConfig(),
    # The single-example demo script: strict comparison, parentheticals kept.
    "demo-script": PipelineConfig(strip_parentheticals=False, inclusive_threshold=False),
    # Tests on random weights: short completions keep the suite fast.
    "test": PipelineConfig(max_new_tokens=48),
}


def from_name(name: str, **overrides: object) -> PipelineConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)  # type: ignore[arg-type]


def from_env(
    base: PipelineConfig | None = None, environ: dict[str, str] | None = None
) -> PipelineConfig:
    """Apply ``CONCEPTSEG_<FIELD>`` overrides (e.g. ``CONCEPTSEG_MAX_NEW_TOKENS=256``)."""
    base = base or PipelineConfig()
    environ = dict(os.environ if environ is None else environ)
    changes: dict[str, object] = {}
    for f in fields(PipelineConfig):
        raw = environ.get(f"CONCEPTSEG_{f.name.upper()}")
        if raw is None:
            continue
        if f.type in ("bool", bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(
                    f"CONCEPTSEG_{f.name.upper()}={raw!r}: use 1/0, true/false or yes/no"
                )
            changes[f.name] = raw.lower() in ("1", "true", "yes")
        else:
            changes[f.name] = int(raw)
    return replace(base, **changes)  # type: ignore[arg-type]


API_KEY_ENV = "CONCEPTSEG_API_KEY"


def api_key(environ: dict[str, str] | None = None) -> str:
    """The restricted-API key ``serve`` gives Triton (``CONCEPTSEG_API_KEY``; empty: none set,
    ``serve`` generates one per run)."""
    return dict(os.environ if environ is None else environ).get(API_KEY_ENV, "")
