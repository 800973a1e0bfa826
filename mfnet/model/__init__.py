"""MFNet's parts: backbones, support attention A_S, scale attention A_M, decoder, baseline."""
