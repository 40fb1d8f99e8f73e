"""Generation: full, speculative (lossless), exit:L, entropy and routed modes over the segmented forward."""
from agp.runtime.events import Event, Summary
from agp.runtime.generator import MODES, GenerateArgs, Generator

__all__ = ["Event", "Summary", "GenerateArgs", "Generator", "MODES"]
