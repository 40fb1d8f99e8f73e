"""Stage 5 transfer: boundary states moved between hosts and the model resumed from them."""
