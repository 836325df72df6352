"""``AdditionalModelOutput(name, gather_context)`` as the container's release has it."""

from dataclasses import dataclass


@dataclass
class AdditionalModelOutput:
    name: str
    gather_context: bool = False
