"""The sampler vocabulary a manifest and a schedule use, defined below the samplers so that ``core`` can check it.

:data:`SAMPLER_KINDS` are the values of a manifest's ``sampler/kind`` and of a schedule's ``sampler``; each kind is
implemented by a class of :data:`l2c_export.samplers.SAMPLERS` (the same keys, in the same order).
:func:`official_cache_calls` is the official mode's rule: the model calls of a kind where the authors' samplers
consult their routers (every other call computes everything).
"""

from __future__ import annotations

SAMPLER_KINDS = ("ddim", "ddpm", "dpm_solver_2s", "diffusers_ddim", "diffusers_dpm_multistep",
                 "diffusers_flow_match_euler", "diffusers_unipc")


def dit_official_calls(num_calls: int) -> list[int]:
    """Where the authors' DiT sampler consults its router: the steps whose router index ``N - 1 - s`` is even,
    except the first step (so every other step computes everything)."""
    return [s for s in range(1, num_calls) if (num_calls - 1 - s) % 2 == 0]


def uvit_official_calls(num_calls: int) -> list[int]:
    """Where the authors' U-ViT sampler consults its router: the first call of solver steps 1 .. K-1 (router ``k``
    serves call ``2k``); step 0 and every midpoint call compute everything."""
    return [2 * k for k in range(1, num_calls // 2)]


# kind -> its official rule. DDIM/DDPM: the authors' DiT sampler's; DPM-Solver-2S: the authors' U-ViT sampler's;
# diffusers' schedulers come with no authors' router, so the official mode uses the DDIM rule's analogue.
OFFICIAL_RULES = {"ddim": dit_official_calls, "ddpm": dit_official_calls, "dpm_solver_2s": uvit_official_calls,
                  "diffusers_ddim": dit_official_calls, "diffusers_dpm_multistep": dit_official_calls,
                  "diffusers_flow_match_euler": dit_official_calls, "diffusers_unipc": dit_official_calls}


def official_cache_calls(kind: str, num_calls: int) -> list[int]:
    """The official rule: the model calls of ``kind`` where the authors' samplers consult their routers (every other
    call computes everything). DDIM/DDPM: the steps whose router index ``N - 1 - s`` is even, except the first;
    DPM-Solver-2S: the first call of solver steps 1 .. K-1; diffusers' schedulers: DDIM's rule."""
    if kind not in OFFICIAL_RULES:
        raise ValueError(f"unknown sampler {kind!r}; expected one of {', '.join(SAMPLER_KINDS)}")
    return OFFICIAL_RULES[kind](num_calls)
