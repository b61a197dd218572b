"""Faces: the Haar detector and landmarks of the preview warp (`detector`, whose `FaceBox` every face locator
returns), the official HunyuanVideo-Avatar detector (`detface`) and its 3x face mask (`mask`)."""
