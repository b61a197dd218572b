"""Face detection and the landmarks the preview warp needs."""
