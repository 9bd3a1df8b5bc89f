"""Models LensLab trains itself (tiny LMs, the bilinear digits MLP, the MiniLM masked-LM head) and their tooling."""
