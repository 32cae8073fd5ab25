"""ucspi: a drop-in Python reimplementation of D. J. Bernstein's ucspi-tcp 0.88."""
