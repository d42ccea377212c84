"""rag_e2e: end-to-end trainable Retrieval-Augmented Generation (Lewis et al., 2020)."""

__version__ = "0.1.0"
