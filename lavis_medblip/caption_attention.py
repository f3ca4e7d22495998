"""Attention maps of the 2D captioner: ``python -m lavis_medblip.caption_attention``, the command of :mod:`lavis_medblip.cli.caption_attention` under its usual name."""
from lavis_medblip.cli.caption_attention import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
