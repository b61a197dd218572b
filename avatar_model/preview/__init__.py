"""The CPU ``preview`` backend: speech envelope → motion track → warped portrait frames."""
