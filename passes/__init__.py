"""FX passes: capture (torch.export → matmul sites) and lowering (sites → ``qcompile::*`` ops)."""
