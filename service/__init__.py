"""SteerServe: personalized image generation and editing served over gRPC."""

__version__ = "0.1.0"
