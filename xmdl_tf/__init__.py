"""xmdl_tf: explainable mitochondria segmentation and morphometry for EM (XM-DL)."""
__version__ = "0.1.0"
