"""Diffusers pipeline folders as models: a transformer class is one declaration, diffusers' own modules do the rest.

A family is one file of this package (``dit.py``, ``pixart.py``, ``sd3.py``, ``flux.py``, ``sana.py``,
``qwenimage.py``) whose ``FAMILY`` is a :class:`~.family.DiffusersFamily` made from a
:class:`~.declaration.Declaration`: like cache-dit's block adapters and Optimum's export configs, it states only what
differs between transformer classes, as data (its classes, blocks and sub-layer module paths, conditioning inputs by
the pipeline's argument names with a kind, guidance rule, latent layout, schedulers, text encoders and VAE). The registry finds the file
(:data:`l2c_export.models.FAMILIES`), and the folder reader maps transformer classes to families from the
declarations (:func:`~.folder.transformer_families`). docs/adding-a-family.md walks through one.

The package, by job: :mod:`.declaration` (the format), :mod:`.family` (the family base, deriving every stage's
answers from a declaration), :mod:`.cache` (the wrapper that makes each named sub-module compute or reuse),
:mod:`.macs` (MAC counting), :mod:`.folder` and :mod:`.files` (reading and checking a folder), :mod:`.mmdit` (what
SD3 and FLUX.1 share), :mod:`.sizes` (the bounds of config fields).
"""

from __future__ import annotations

from .cache import OutputPacking
from .declaration import (JOINT_TOKENS, PROMPT_TOKENS, Blocks, Conditioning, Declaration, Guidance, TextEncoder,
                          TextEncoderStack, VaeKind)
from .family import DiffusersConfig, DiffusersFamily
from .files import MODEL_INDEX, WEIGHTS_FILE, WEIGHTS_INDEX, DiffusersFolderError, weight_files
from .folder import (DiffusersFolder, FolderComponents, FolderExpert, FolderExperts, check_model_index,
                     check_tokenizer, read_components, read_folder, transformer_families)
from .macs import count_macs_by_hooks

__all__ = ["JOINT_TOKENS", "MODEL_INDEX", "PROMPT_TOKENS", "WEIGHTS_FILE", "WEIGHTS_INDEX", "Blocks", "Conditioning",
           "Declaration", "DiffusersConfig", "DiffusersFamily", "DiffusersFolder", "DiffusersFolderError",
           "FolderComponents", "FolderExpert", "FolderExperts", "Guidance", "OutputPacking", "TextEncoder",
           "TextEncoderStack", "VaeKind",
           "check_model_index", "check_tokenizer", "count_macs_by_hooks", "read_components", "read_folder",
           "transformer_families", "weight_files"]
