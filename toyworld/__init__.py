"""A procedural toy world and a small FLUX-architecture model trained on it, with an exact judge.

world.py renders captioned scenes of shapes whose colour, texture and shape words are drawn per
object, with known layouts; train.py trains a small FluxTransformer2DModel (plus a tiny VAE) on
them; judge.py segments and classifies generated images exactly enough to count entities and
attribute leakage; evaluate.py measures vanilla vs DeLeaker leakage through the runtime.
"""
