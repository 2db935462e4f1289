"""attnx.interpret: capture, score and plot attention maps."""
