"""dpdiff: differentially private image generation on the Hugging Face stack."""

__version__ = "0.1.0"
