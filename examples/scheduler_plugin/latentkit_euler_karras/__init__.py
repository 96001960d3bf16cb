"""An example latentkit scheduler plugin: Euler with Karras sigmas unless told otherwise.

Registered through the ``latentkit.schedulers`` entry-point group in ``pyproject.toml``;
nothing here calls ``latentkit.schedulers.register``. Once installed::

    latentkit schedulers                  # lists euler-karras
    latentkit.generate("a cat", scheduler="euler-karras")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from latentkit.schedulers.euler import Euler


@dataclass(frozen=True, kw_only=True)
class EulerKarras(Euler):
    """Euler's method over Karras sigmas (Karras et al. 2022, eq. 5).

    A subclass only changes defaults; every option of ``euler`` still applies, and a model's
    scheduler config carries over as for any registration, except ``use_karras_sigmas``
    (``not_carried``): an SDXL config's ``use_karras_sigmas: false`` must not turn the Karras
    sigmas off. It writes the diffusers config of ``EulerDiscreteScheduler`` with
    ``use_karras_sigmas=True``, which diffusers reads as the same sampler.
    """

    name: ClassVar[str] = "euler-karras"
    not_carried: ClassVar[tuple[str, ...]] = ("use_karras_sigmas",)
    use_karras_sigmas: bool = True
