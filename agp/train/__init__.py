"""One module per curriculum stage; the order and the stage contract live in agp/stages.py."""
