"""Sampling from a build: each model call dispatched to its subset's engine, cached activations fed between them.
Everything is read from the manifest; the backends (onnxruntime, tensorrt, torch) sit behind one interface."""
